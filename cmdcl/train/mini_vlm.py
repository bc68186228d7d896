"""A mini vision-language model for the synthetic world (`cmdcl-mini-vlm`).

Without CLIP weights the `tiny` model's "frozen VLM" is a random image tower, whose frame embeddings are nearly
collinear, so the dictionaries V_P and Z cluster noise. This module gives it a VLM of its own:

- a captioned image corpus from cmdcl.data.synth's renderer (its backgrounds, its atomic actions' shapes and
  motions at random phases and places, colours drawn from its palette independently of the shape, and empty
  backgrounds), from RNG streams of its own (`corpus_rng`), so that no frame is a frame of a cmdcl-synth split;
  captions name what one frame shows (shape, colour, background colour and texture), never an activity or an
  atomic action (the motion is not named: one frame does not show it);
- CLIP's contrastive pretraining (symmetric InfoNCE, learnable logit scale) of the `tiny` image tower against
  frozen all-MiniLM-L6-v2 caption embeddings through a learned linear projection 384 -> D_vlm;
- the result saved as a CLIP weights file: OpenAI's `visual.*` keys and `logit_scale`, `minilm_projection`
  [384, D_vlm] in place of the transformer text tower, and `vision_heads` (a scalar: OpenAI's heads are 64 wide,
  the tiny tower's 32). cmdcl.model.load_clip reads it, and `cmdcl-train
  --clip-weights FILE` uses it as it would OpenAI's ViT-B/16 (the text side embeds the label prompts).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synth import ATOMIC_ACTIONS, BACKGROUNDS, render_action, render_background
from ..model.clip import CLIP, minilm_embeddings
from ..model.config import CLIP_MEAN, CLIP_STD, tiny_config
from .loop import check_finite, warmup_cosine

# Names of the renderer's colours (object palette, then backgrounds), in words a caption can use.
OBJECT_COLOURS = {
    (60, 120, 230): "blue", (150, 90, 40): "brown", (240, 240, 240): "white", (240, 220, 60): "yellow",
    (250, 140, 30): "orange", (210, 40, 40): "red", (40, 180, 60): "green", (70, 50, 40): "dark brown",
}
BACKGROUND_NAMES = ["slate grey plain", "beige horizontally striped", "green checkered", "pink dotted",
                    "purple vertically graded", "olive diagonally striped", "teal noisy"]
CORPUS_STREAM = 7_771  # the corpus's RNG streams are [seed, CORPUS_STREAM, part]; cmdcl-synth's are [seed, split]
PARTS = ("train", "heldout")
ATTRIBUTES = ("shape", "colour", "background")


@dataclass
class Corpus:
    """Frames uint8 [N, size, size, 3], and per frame the index of its caption in `captions` (unique texts);
    `attributes[name][c]` is caption c's shape / colour / background ("none" for an empty background)."""

    frames: np.ndarray
    caption_index: np.ndarray
    captions: list[str]
    attributes: dict[str, list[str]]


def corpus_rng(seed: int, part: str) -> np.random.Generator:
    """The corpus's own stream: cmdcl-synth draws from [seed, split index], this from [seed, CORPUS_STREAM, part]."""
    return np.random.default_rng([seed, CORPUS_STREAM, PARTS.index(part)])


def caption(shape: str | None, colour: str | None, background: int, count: int = 1) -> str:
    """What one frame shows, in words."""
    where = f"{BACKGROUND_NAMES[background]} background"
    if shape is None:
        return f"an empty {where}"
    return f"two {colour} {shape}s on a {where}" if count == 2 else f"a {colour} {shape} on a {where}"


def render_frame(rng: np.random.Generator, size: int = 96, empty_share: float = 0.1):
    """One frame as cmdcl.data.synth renders it, and its (shape, colour, background, count); shape None: empty."""
    background = int(rng.integers(len(BACKGROUNDS)))
    canvas = render_background(background, size, rng)
    shape = colour = None
    count = 1
    if rng.random() >= empty_share:
        actions = list(ATOMIC_ACTIONS)
        action = actions[int(rng.integers(len(actions)))]  # only its shape and motion are used, never its name
        palette = list(OBJECT_COLOURS)
        rgb = palette[int(rng.integers(len(palette)))]
        shape, colour, motion = ATOMIC_ACTIONS[action][0], OBJECT_COLOURS[rgb], ATOMIC_ACTIONS[action][2]
        phase = rng.random()
        place = rng.uniform(0.35, 0.65, 2) * size  # the renderer's ranges (cmdcl.data.synth.render_video)
        radius = size * rng.uniform(0.1, 0.14)
        render_action(canvas, action, phase, place, np.clip(np.array(rgb) + rng.uniform(-25, 25, 3), 0, 255), radius)
        # "split" draws two circles of radius 0.8 r at +-0.18 size * phase: two apart once their centres are a diameter apart
        if motion == "split" and 0.18 * size * phase > 0.8 * radius:
            count = 2
    canvas += rng.normal(0, 4, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), (shape, colour, background, count)


def make_corpus(pairs: int, seed: int, part: str = "train", size: int = 96, progress: bool = False) -> Corpus:
    """`pairs` captioned frames from the `part` stream ("train" or "heldout")."""
    from tqdm import tqdm

    rng = corpus_rng(seed, part)
    frames = np.empty((pairs, size, size, 3), dtype=np.uint8)
    index, captions, attributes = np.empty(pairs, dtype=np.int64), {}, {name: [] for name in ATTRIBUTES}
    for i in tqdm(range(pairs), desc=f"mini-VLM corpus ({part})", disable=not progress, unit="frame"):
        frames[i], (shape, colour, background, count) = render_frame(rng, size)
        text = caption(shape, colour, background, count)
        if text not in captions:
            captions[text] = len(captions)
            for name, value in zip(ATTRIBUTES, (shape or "none", colour or "none", BACKGROUND_NAMES[background])):
                attributes[name].append(value)
        index[i] = captions[text]
    return Corpus(frames, index, list(captions), attributes)


def preprocess(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> the image tower's input, normalised as CMDCL.vlm_tokens does (CLIP's mean and std)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def new_clip(seed: int = 0) -> CLIP:
    """The tiny preset's image tower (OpenAI layout, visual.proj to D_vlm) with a MiniLM text side, CLIP's initial
    temperature (logit scale log(1/0.07))."""
    torch.manual_seed(seed)
    clip = CLIP(tiny_config().vision, None)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1 / 0.07))
    return clip


def clip_loss(image_features, text_features, logit_scale, caption_ids) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. A batch repeats captions (the corpus has far fewer captions than frames), so every
    pair with the same caption is a positive: the targets spread evenly over them instead of a one-hot diagonal."""
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain(clip: CLIP, corpus: Corpus, caption_embeddings: torch.Tensor, epochs: int, batch_size: int = 128,
             lr: float = 1e-3, seed: int = 0, progress: bool = False) -> list[float]:
    """Contrastive pretraining of clip's image tower and MiniLM projection; returns the mean loss of each epoch.
    TrainingDiverged as soon as the loss or the weights are not finite.

    `caption_embeddings` [len(corpus.captions), 384]: the frozen MiniLM embeddings of the unique captions."""
    from tqdm import tqdm

    clip.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(corpus.frames) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, steps // 10), steps))
    frames, caption_ids = torch.from_numpy(corpus.frames), torch.from_numpy(corpus.caption_index)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with tqdm(total=steps, desc="mini-VLM pretraining", disable=not progress, unit="step") as bar:
        for epoch in range(epochs):
            total, order = 0.0, torch.randperm(len(frames), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                ids = caption_ids[batch]
                loss = clip_loss(clip.encode_image(preprocess(frames[batch])), clip.encode_text(caption_embeddings[ids]),
                                 clip.logit_scale, ids)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
                check_finite(loss.item(), clip, f"in epoch {epoch + 1}", "nothing written")
                total += loss.item() * len(batch)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / len(order))
    clip.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def similarity(clip: CLIP, corpus: Corpus, caption_embeddings: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Cosine similarity [frames, unique captions] of the corpus's frames to its captions."""
    frames = torch.from_numpy(corpus.frames)
    images = torch.cat([clip.encode_image(preprocess(frames[s : s + batch_size])) for s in range(0, len(frames), batch_size)])
    return F.normalize(images, dim=-1) @ F.normalize(clip.encode_text(caption_embeddings), dim=-1).T


def retrieval(scores: torch.Tensor, caption_index: np.ndarray, attributes: dict[str, list[str]]) -> dict:
    """Zero-shot retrieval from scores [frames, unique captions], each figure with its chance level.

    - image -> caption top-1: the best-scoring caption is the frame's own (chance: 1 / captions);
    - caption -> image top-1: over the captions some frame has, the best-scoring frame has that caption
      (chance: the share of frames that have it, averaged over captions);
    - per attribute: the frame's best caption names the frame's shape / colour / background (chance: the share
      of captions naming the frame's value, averaged over frames)."""
    truth = np.asarray(caption_index)
    best_caption = scores.argmax(dim=1).numpy()
    present = np.unique(truth)
    best_image = scores[:, present].argmax(dim=0).numpy()
    counts = np.bincount(truth, minlength=scores.shape[1])
    report = {
        "image_to_caption_top1": float((best_caption == truth).mean()),
        "image_to_caption_chance": 1.0 / scores.shape[1],
        "caption_to_image_top1": float((truth[best_image] == present).mean()),
        "caption_to_image_chance": float((counts[present] / len(truth)).mean()),
    }
    for name, values in attributes.items():
        values = np.asarray(values)
        report[f"{name}_top1"] = float((values[best_caption] == values[truth]).mean())
        report[f"{name}_chance"] = float((values[None, :] == values[truth][:, None]).mean())
    return report


def save_mini_vlm(clip: CLIP, path: str | Path) -> None:
    """Write clip as a CLIP weights file (OpenAI layout; text side `minilm_projection`; `vision_heads`, since the
    tiny tower's heads are not OpenAI's 64 wide), atomically."""
    from ..output_files import atomic_write

    state = {k: v.detach().clone().contiguous() for k, v in clip.state_dict_openai().items()}
    state["vision_heads"] = torch.tensor(clip.visual.cfg.heads)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def run(out: str | Path, seed: int = 0, pairs: int = 10_000, heldout: int = 1_000, epochs: int = 8, batch_size: int = 128,
        lr: float = 1e-3, progress: bool = False) -> dict:
    """Build the corpus, pretrain, save to `out` and return the report (timings, losses, held-out retrieval)."""
    started = time.perf_counter()
    corpus = make_corpus(pairs, seed, "train", progress=progress)
    test = make_corpus(heldout, seed, "heldout", progress=progress)
    embeddings = minilm_embeddings(corpus.captions + test.captions)
    train_embeddings, test_embeddings = embeddings[: len(corpus.captions)], embeddings[len(corpus.captions) :]
    rendered = time.perf_counter()
    clip = new_clip(seed)
    losses = pretrain(clip, corpus, train_embeddings, epochs, batch_size, lr, seed, progress)
    trained = time.perf_counter()
    save_mini_vlm(clip, out)
    return {
        "out": str(out), "seed": seed, "pairs": pairs, "heldout_pairs": heldout, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "captions": len(corpus.captions), "heldout_captions": len(test.captions),
        "corpus_seconds": round(rendered - started, 1), "pretrain_seconds": round(trained - rendered, 1),
        "losses": [round(v, 4) for v in losses], "logit_scale": round(float(clip.logit_scale.exp()), 2),
        "heldout_retrieval": retrieval(similarity(clip, test, test_embeddings), test.caption_index, test.attributes),
    }
