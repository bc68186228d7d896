"""The offline dictionaries of CMDCL (docs/design.md section 2.2).

From frozen-VLM tokens of the training frames (CMDCL.vlm_tokens on a frozen
copy of the image tower):
- `V_P` (Kb x D_vlm), the cross-modal bias dictionary: k-means centres of the
  frame embeddings (class tokens), prior pi_b = cluster frequencies;
- `Z` (Kz x D_vlm), the visual confounder dictionary: k-means centres of the
  pooled patch tokens (the class token when the model has no patch grid),
  prior pi_z = cluster frequencies.
k-means is scikit-learn's MiniBatchKMeans, fed batch by batch so it can show
progress; the features are cached on disk by the training loop.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def extract_features(model, frames: torch.Tensor, batch_size: int = 64, device="cpu", progress: bool = False) -> dict:
    """frames uint8 [N, H, W, 3] -> {"frame": [N, D_vlm], "patch": [N * g*g, D_vlm]} (float32, CPU).

    `model` is a CMDCL whose image tower is the frozen VLM (e.g. a freshly
    built model before training, or one made with CMDCL.from_clip)."""
    from tqdm import tqdm

    frame_feats, patch_feats = [], []
    for start in tqdm(range(0, len(frames), batch_size), desc="VLM features", disable=not progress, unit="batch"):
        tokens = model.vlm_tokens(frames[start : start + batch_size].to(device)).float().cpu()
        frame_feats.append(tokens[:, 0])
        patch_feats.append((tokens[:, 1:] if tokens.shape[1] > 1 else tokens[:, :1]).flatten(0, 1))
    return {"frame": torch.cat(frame_feats), "patch": torch.cat(patch_feats)}


def kmeans_dictionary(features: torch.Tensor, k: int, seed: int = 0, epochs: int = 5, batch_size: int = 2048, name: str = "dictionary",
                      progress: bool = False):
    """k-means centres [k, D] and prior [k] (cluster frequencies over all `features`, sums to 1)."""
    from sklearn.cluster import MiniBatchKMeans
    from tqdm import tqdm

    x = features.double().numpy()
    if len(x) < k:
        raise ValueError(f"{name}: {k} clusters need at least {k} feature vectors, got {len(x)} "
                         "(use more training videos or a smaller dictionary)")
    batch_size = max(batch_size, k)  # the first partial_fit initialises k centres from one batch
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3)
    rng = np.random.default_rng(seed)
    batches = [(e, s) for e in range(epochs) for s in range(0, len(x), batch_size)]
    for _, start in tqdm(batches, desc=f"k-means {name} (k={k})", disable=not progress, unit="batch"):
        if start == 0:
            order = rng.permutation(len(x))
        kmeans.partial_fit(x[order[start : start + batch_size]])
    counts = np.bincount(kmeans.predict(x), minlength=k).astype(np.float64)
    centres = torch.from_numpy(kmeans.cluster_centers_).float()
    return centres, torch.from_numpy(counts / counts.sum()).float()


def build_dictionaries(features: dict, num_bias: int, num_confounders: int, seed: int = 0, progress: bool = False) -> dict:
    """{"bias_dict", "bias_prior", "conf_dict", "conf_prior"} from extract_features' output."""
    bias_dict, bias_prior = kmeans_dictionary(features["frame"], num_bias, seed, name="V_P", progress=progress)
    conf_dict, conf_prior = kmeans_dictionary(features["patch"], num_confounders, seed + 1, name="Z", progress=progress)
    return {"bias_dict": bias_dict, "bias_prior": bias_prior, "conf_dict": conf_dict, "conf_prior": conf_prior}
