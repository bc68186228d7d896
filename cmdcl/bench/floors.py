"""FLOP and byte floors of CMDCL inference, counted from the config.

The least work any backend must do for one clip, so that a measured latency
can be read as a fraction of what the hardware could reach:

- FLOPs: the matrix products (2 FLOPs per multiply-add) of the frame encoder
  (patch embedding, ViT blocks, output projection, token projection, per
  frame), the spatio-temporal blocks over L = F*S tokens, the visual
  intervention (query / gate / output projections and the fused op over
  C + Kz memory rows) and the classifier. LayerNorm, softmax, activations and
  other elementwise work are not counted. The textual branch and the
  intervention memories are constants folded at export, so they cost nothing
  per clip.
- Bytes: the weights the graph holds, read once per batch (so a clip's share
  is weights / B), plus the clip's uint8 frames in and logits + embedding out.
  Activations are assumed to stay on chip, which is what makes it a floor.
"""

from __future__ import annotations

from ..model.config import CMDCLConfig


def block_flops(tokens: int, width: int, hidden: int) -> int:
    """One pre-LN transformer block over `tokens` tokens: QKV, QK^T, AV, output
    projection, two-layer MLP."""
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return projections + attention


def model_flops(cfg: CMDCLConfig, num_classes: int) -> dict:
    """FLOPs per clip of F frames, by part: {"frame_encoder", "head", "intervention_op", "clip"}.
    "frame_encoder" is all F frames; "intervention_op" is part of "head"."""
    v = cfg.vision
    patches, tokens_in = v.grid**2, v.grid**2 + 1
    vit_hidden = int(v.width * 4.0)
    per_frame = (
        2 * patches * (3 * v.patch_size**2) * v.width  # patch embedding (conv)
        + v.layers * block_flops(tokens_in, v.width, vit_hidden)
        + 2 * tokens_in * v.width * v.output_dim  # ln_post @ proj, every token
        + 2 * cfg.tokens_per_frame * v.output_dim * cfg.width  # token projection to D
    )
    f, d = cfg.num_frames, cfg.width
    seq_len = f * cfg.tokens_per_frame
    head = cfg.depth * block_flops(seq_len, d, int(d * cfg.mlp_ratio))
    op = 0
    if cfg.visual_intervention:
        op = 4 * seq_len * d * (num_classes + cfg.num_confounders)  # QK^T and PV over both memories
        head += 2 * seq_len * d * d * 2 + 2 * seq_len * 2 * d * d + op  # query + gate, output projection, the op
    head += 2 * d * d + 2 * d * num_classes  # video projection, cosine classifier
    frame_encoder = f * per_frame
    return {"frame_encoder": frame_encoder, "head": head, "intervention_op": op, "clip": frame_encoder + head}


def inference_parameters(cfg: CMDCLConfig, num_classes: int) -> int:
    """Values the exported full graph holds: the image tower, token projection,
    embeddings, STA blocks, visual intervention (with its folded memories
    Kt, Vt [C, D], Kz, Vz [Kz, D] and log prior), T', and the classifier."""
    v = cfg.vision
    d, dv = cfg.width, v.output_dim

    def block(width, hidden):
        return 3 * width * width + 3 * width + width * width + width + 2 * width * hidden + hidden + width + 4 * width

    tower = (3 * v.patch_size**2 * v.width + v.width + (v.grid**2 + 1) * v.width + 2 * v.width
             + v.layers * block(v.width, 4 * v.width) + 2 * v.width + v.width * dv)
    head = dv * d + d + cfg.num_frames * d + cfg.tokens_per_frame * d + cfg.depth * block(d, int(d * cfg.mlp_ratio)) + 2 * d
    if cfg.visual_intervention:
        head += (d * d + d) * 2 + (2 * d * d + d) + 2 * d  # query, gate, output projection, LayerNorm
        head += 2 * num_classes * d + 2 * cfg.num_confounders * d + cfg.num_confounders  # folded memories, log prior
    head += (d if cfg.pooling == "attention" else 0) + d * d + num_classes * d + 2  # Wp, T', logit scale and bias
    return tower + head


def model_floors(cfg: CMDCLConfig, num_classes: int, batch: int = 1, bytes_per_value: int = 4) -> dict:
    """Per-clip floors at `batch` clips per call: FLOPs by part, bytes moved
    (weights / batch + frames in + outputs out) and FLOPs per byte."""
    flops = model_flops(cfg, num_classes)
    weights = inference_parameters(cfg, num_classes) * bytes_per_value
    size = cfg.vision.image_size
    io_bytes = cfg.num_frames * size * size * 3 + 4 * (num_classes + cfg.width)  # uint8 frames; fp32 logits, embedding
    per_clip = weights / batch + io_bytes
    return {"batch": batch, "bytes_per_value": bytes_per_value, "flops": flops, "weight_bytes": weights,
            "io_bytes": io_bytes, "bytes_per_clip": per_clip, "flops_per_byte": flops["clip"] / per_clip}
