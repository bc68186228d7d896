"""Intervention diagnostics: do a CMDCL model's causal modules do anything? (issue 16; docs/design.md section 8)

For each intervention that is on, from the model's own attention weights and logits:
- how far its attention is from its prior: mean entropy as a share of log K (1 = uniform) and mean KL to the prior
  (0 = the attention is the prior, whatever the input);
- how much the logits depend on its dictionary: the relative L2 change of each clip's logits and the share of clips
  whose top-1 flips when the rows are shuffled (the prior stays in place) or replaced by Gaussian rows of the same
  per-dimension mean and std;
- for the confounder attention, a probe: how well a label of the input (e.g. the synthetic background) can be read
  from each clip's mean attention over Z, by cross-validated logistic regression, next to the same probe on what the
  tokens carry (the mean of the intervention's input X).
An inert intervention shows entropy near 1, KL near 0, small logit changes and few flips.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..data.manifest import ManifestError, VideoEntry, read_csv, shown
from ..model import CMDCL

PROBE_FOLDS = 5  # cross-validation folds of the probe; every label needs at least this many clips


@torch.no_grad()
def intervention_diagnostics(model: CMDCL, clips: torch.Tensor, probe_labels=None, seed: int = 0, batch_size: int = 16) -> dict:
    """The diagnostics of `model` on uint8 clips [N, F, H, W, 3] (see the module docstring); `probe_labels`: one label
    per clip (any hashable) for the confounder-attention probe. An intervention that is off is None. The model is
    left as it was (dictionaries and train/eval mode restored)."""
    if probe_labels is not None and len(probe_labels) != len(clips):
        raise ValueError(f"got {len(probe_labels)} probe labels for {len(clips)} clips")
    training = model.training
    model.eval()
    try:
        tokens = _tokens(model, clips, batch_size)
        logits = _logits(model, tokens, batch_size)
        report = {"clips": len(clips), "seed": seed, "textual": None, "visual": None}
        if model.cfg.textual_intervention:
            weights = model.textual.attention(model.text_proj(model.text), model.bias_dict, model._log(model.bias_prior))
            report["textual"] = {
                "entries": len(model.bias_prior), **_spread(weights, model.bias_prior),
                "row_cosine": _mean_pairwise_cosine(model.bias_dict),
                **_sensitivity(model, "bias_dict", tokens, logits, seed, batch_size),
            }
        if model.cfg.visual_intervention:
            report["visual"] = {**_visual(model, tokens, probe_labels, seed, batch_size),
                                **_sensitivity(model, "conf_dict", tokens, logits, seed, batch_size)}
        return report
    finally:
        model.train(training)


def _device(model: CMDCL) -> torch.device:
    return next(model.parameters()).device


def _tokens(model: CMDCL, clips: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Frame tokens [N, F, S, D] (on the CPU): the encoder runs once, every dictionary change reruns only the head."""
    out = []
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size].to(_device(model))
        tokens = model.frame_tokens(batch.flatten(0, 1))
        out.append(tokens.view(*batch.shape[:2], *tokens.shape[1:]).float().cpu())
    return torch.cat(out)


def _logits(model: CMDCL, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.head(tokens[start : start + batch_size].to(_device(model)))[0].double().cpu()
                      for start in range(0, len(tokens), batch_size)])


def _spread(weights: torch.Tensor, prior: torch.Tensor | None = None) -> dict:
    """Attention rows weights [..., K]: mean entropy / log K and, with `prior` [K], mean KL(weights || prior) in nats."""
    rows = weights.reshape(-1, weights.shape[-1]).double().cpu()
    neg_entropy = torch.xlogy(rows, rows).sum(dim=-1)  # 0 log 0 = 0
    k = rows.shape[-1]
    out = {"entropy_ratio": (-neg_entropy.mean() / math.log(k)).item() if k > 1 else None}
    if prior is not None:
        log_prior = torch.log(prior.double().cpu().clamp_min(1e-12))  # as CMDCL._log
        out["kl_to_prior"] = (neg_entropy - rows @ log_prior).mean().item()
    return out


def _mean_pairwise_cosine(rows: torch.Tensor) -> float | None:
    """Mean cosine between distinct dictionary rows (near 1: the rows, hence the keys, barely differ)."""
    if len(rows) < 2:
        return None
    unit = torch.nn.functional.normalize(rows.double().cpu(), dim=-1)
    cosines = unit @ unit.T
    return ((cosines.sum() - cosines.diagonal().sum()) / (len(rows) * (len(rows) - 1))).item()


def _replacements(rows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The two stand-ins for a dictionary: its rows in a seeded random order (the prior stays, so row and prior no
    longer match), and Gaussian rows with its per-dimension mean and std."""
    generator = torch.Generator().manual_seed(seed)
    cpu = rows.cpu()
    order = torch.randperm(len(cpu), generator=generator)
    gaussian = cpu.mean(dim=0) + cpu.std(dim=0, correction=0) * torch.randn(cpu.shape, generator=generator, dtype=cpu.dtype)
    return {"shuffled": cpu[order], "replaced": gaussian}


def _sensitivity(model: CMDCL, name: str, tokens: torch.Tensor, logits: torch.Tensor, seed: int, batch_size: int) -> dict:
    """Logit changes with the dictionary buffer `name` shuffled and replaced; the buffer is restored bit for bit."""
    buffer = getattr(model, name)
    saved = buffer.clone()
    out = {}
    try:
        for kind, rows in _replacements(saved, seed).items():
            buffer.copy_(rows)
            changed = _logits(model, tokens, batch_size)
            relative = (changed - logits).norm(dim=-1) / logits.norm(dim=-1).clamp_min(1e-12)
            flips = int((changed.argmax(dim=-1) != logits.argmax(dim=-1)).sum())
            out[kind] = {"relative_change": relative.mean().item(), "max_relative_change": relative.max().item(),
                         "flips": flips, "flip_share": flips / len(logits)}
    finally:
        buffer.copy_(saved)
    return out


def _visual(model: CMDCL, tokens: torch.Tensor, probe_labels, seed: int, batch_size: int) -> dict:
    """Spread of the confounder (over Z) and mediator (over T') attentions of every token, and the probe."""
    memories = model.intervention_memories(model.text_features())
    confounder, mediator, attention_means, input_means = [], [], [], []
    for start in range(0, len(tokens), batch_size):
        x = model.contextualize(tokens[start : start + batch_size].to(_device(model)))
        mediator_weights, confounder_weights = model.visual.attention(x, memories)  # [B, h, L, C], [B, h, L, Kz]
        confounder.append((len(x), _spread(confounder_weights, model.conf_prior)))
        mediator.append((len(x), _spread(mediator_weights)))
        attention_means.append(confounder_weights.mean(dim=(1, 2)).double().cpu())
        input_means.append(x.mean(dim=1).double().cpu())

    def mean(parts, key):  # over clips: each has the same number of attention rows
        return None if parts[0][1][key] is None else sum(n * part[key] for n, part in parts) / len(tokens)

    out = {"entries": len(model.conf_prior), "classes": len(model.class_names),
           "entropy_ratio": mean(confounder, "entropy_ratio"), "kl_to_prior": mean(confounder, "kl_to_prior"),
           "mediator_entropy_ratio": mean(mediator, "entropy_ratio"), "row_cosine": _mean_pairwise_cosine(model.conf_dict)}
    if probe_labels is None:
        return {**out, "probe": None, "probe_skipped": "no probe labels given"}
    skipped = probe_problem(probe_labels)
    if skipped:
        return {**out, "probe": None, "probe_skipped": skipped}
    labels = list(probe_labels)
    counts = Counter(labels)
    out["probe_skipped"], out["probe"] = None, {
        "attention_accuracy": _probe_accuracy(torch.cat(attention_means).numpy(), labels, seed),
        "input_accuracy": _probe_accuracy(torch.cat(input_means).numpy(), labels, seed),
        "chance": max(counts.values()) / len(labels), "labels": len(counts), "folds": PROBE_FOLDS,
    }
    return out


def probe_problem(labels) -> str | None:
    """Why the probe cannot run on `labels`, or None: it needs 2 labels and PROBE_FOLDS clips of each."""
    counts = Counter(labels)
    if len(counts) < 2:
        return f"the probe needs at least 2 distinct labels; got {len(counts)}"
    rarest = min(counts, key=counts.get)
    if counts[rarest] < PROBE_FOLDS:
        return (f"the probe needs at least {PROBE_FOLDS} clips of every label ({PROBE_FOLDS}-fold cross-validation); "
                f"{shown(str(rarest))} has {counts[rarest]}")
    return None


def _probe_accuracy(features, labels, seed: int) -> float:
    """Mean accuracy of a standardised logistic regression over stratified folds. Standardising matters: attention
    vectors close to the prior differ by small amounts that an unscaled, regularised probe would not see."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features, labels, cv=folds).mean())


def read_probe_labels(path: str | Path, entries: list[VideoEntry]) -> list[str]:
    """One label per entry, from a CSV `video,label` (videos relative to the CSV's folder, as in a manifest). A
    malformed line, a video not among `entries`, one listed twice, or an entry without a label raises ManifestError
    naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such probe-label file")
    rows = read_csv(path, "probe-label file")
    if not rows or [c.strip() for c in rows[0][1]] != ["video", "label"]:
        raise ManifestError(f"{path}:{rows[0][0] if rows else 1}: the header must be 'video,label'")
    wanted = {entry.path.resolve(): i for i, entry in enumerate(entries)}
    labels: dict[int, tuple[str, int]] = {}  # entry index -> (label, line)
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ManifestError(f"{path}:{line}: expected a video and a label")
        video = Path(row[0].strip())
        index = wanted.get((video if video.is_absolute() else path.parent / video).resolve())
        if index is None:
            raise ManifestError(f"{path}:{line}: video {shown(row[0].strip())} is not among the evaluated videos")
        if index in labels:
            raise ManifestError(f"{path}:{line}: video {shown(row[0].strip())} is already listed on line {labels[index][1]}")
        labels[index] = (row[1].strip(), line)
    missing = [entry for i, entry in enumerate(entries) if i not in labels]
    if missing:
        where = f" (listed at {missing[0].listed_at})" if missing[0].listed_at else ""
        raise ManifestError(f"{path}: no label for {missing[0].path}{where} ({len(missing)} videos without one)")
    return [labels[i][0] for i in range(len(entries))]


def format_diagnostics(report: dict) -> str:
    """The diagnostics as a table for the terminal."""
    lines = [f"Interventions ({report['clips']} clips; dictionary stand-ins seeded {report['seed']})"]

    def row(label, value, note=""):
        text = "n/a" if value is None else value if isinstance(value, str) else f"{value:.3g}"
        lines.append(f"  {label:<38} {text}{note}")

    def sensitivity(part, name):
        row(f"logits with {name}:", "rel. L2 change mean / max   top-1 flips")
        for kind, label in (("shuffled", "rows shuffled (prior kept)"), ("replaced", "Gaussian rows")):
            s = part[kind]
            row(f"  {label}", f"{s['relative_change']:>6.3f} / {s['max_relative_change']:<6.3f}"
                              f"          {s['flips']} of {report['clips']} ({100 * s['flip_share']:.1f}%)")

    textual = report["textual"]
    if textual is None:
        lines.append("textual (back-door): off")
    else:
        lines.append(f"textual (back-door): label texts over V_P, Kb = {textual['entries']}")
        row("attention entropy / log Kb", textual["entropy_ratio"], "   (1 = uniform)")
        row("KL to the prior pi_b (nats)", textual["kl_to_prior"], "   (0 = the prior)")
        row("V_P rows: mean pairwise cosine", textual["row_cosine"])
        sensitivity(textual, "V_P")
    visual = report["visual"]
    if visual is None:
        lines.append("visual (front-door): off")
        return "\n".join(lines)
    lines.append(f"visual (front-door): tokens over Z, Kz = {visual['entries']}, and over T', C = {visual['classes']}")
    row("attention over Z: entropy / log Kz", visual["entropy_ratio"], "   (1 = uniform)")
    row("attention over Z: KL to pi_z (nats)", visual["kl_to_prior"], "   (0 = the prior)")
    row("attention over T': entropy / log C", visual["mediator_entropy_ratio"])
    row("Z rows: mean pairwise cosine", visual["row_cosine"])
    sensitivity(visual, "Z")
    probe = visual["probe"]
    if probe is None:
        row("probe", f"skipped ({visual['probe_skipped']})")
    else:
        row("probe: label read from", f"accuracy ({probe['labels']} labels, {probe['folds']}-fold logistic regression)")
        row("  the attention over Z", f"{probe['attention_accuracy']:.3f}")
        row("  the tokens (mean of X)", f"{probe['input_accuracy']:.3f}")
        row("  chance (the commonest label's share)", f"{probe['chance']:.3f}")
    return "\n".join(lines)
