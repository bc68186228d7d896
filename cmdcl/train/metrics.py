"""Evaluation metrics: top-k accuracy (single-label) and mAP (multi-label), per class."""

from __future__ import annotations

import numpy as np
import torch


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose class index `targets` is among the k highest scores."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    return hits.float().mean().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float | None]]:
    """mAP over classes with at least one positive (others get None), as Charades reports it."""
    from sklearn.metrics import average_precision_score

    per_class = []
    for c in range(scores.shape[1]):
        positives = targets[:, c] > 0
        if positives.any():
            per_class.append(float(average_precision_score(positives.numpy(), scores[:, c].numpy())))
        else:
            per_class.append(None)
    valid = [ap for ap in per_class if ap is not None]
    return (float(np.mean(valid)) if valid else float("nan")), per_class


def classification_report(scores: torch.Tensor, targets: torch.Tensor, multi_label: bool, classes: list[str]) -> dict:
    """Metrics of `scores` [N, C] against class indices [N] or multi-hot [N, C].

    Single-label: top1, top5 and per-class accuracy (recall); multi-label: mAP
    and per-class AP. Returned as plain types (JSON and checkpoint friendly).
    """
    scores, targets = scores.detach().float().cpu(), targets.cpu()
    report: dict = {"videos": int(scores.shape[0]), "classes": len(classes), "multi_label": multi_label}
    rows = []
    if multi_label:
        report["mAP"], per_class = mean_average_precision(scores, targets)
        for c, name in enumerate(classes):
            rows.append({"class": name, "videos": int((targets[:, c] > 0).sum()), "AP": per_class[c]})
    else:
        report["top1"] = topk_accuracy(scores, targets, 1)
        report["top5"] = topk_accuracy(scores, targets, 5)
        predicted = scores.argmax(dim=1)
        for c, name in enumerate(classes):
            mine = targets == c
            n = int(mine.sum())
            rows.append({"class": name, "videos": n, "accuracy": (predicted[mine] == c).float().mean().item() if n else None})
    report["per_class"] = rows
    return report


def format_report(report: dict) -> str:
    """A plain-text summary and per-class table."""
    if report["multi_label"]:
        lines = [f"videos {report['videos']}  classes {report['classes']}  mAP {100 * report['mAP']:.2f}"]
        key, title = "AP", "AP %"
    else:
        lines = [f"videos {report['videos']}  classes {report['classes']}  top-1 {100 * report['top1']:.2f}  "
                 f"top-5 {100 * report['top5']:.2f}"]
        key, title = "accuracy", "acc %"
    width = max([len("class")] + [len(r["class"]) for r in report["per_class"]])
    lines.append(f"{'class':<{width}}  {'videos':>6}  {title:>6}")
    for r in report["per_class"]:
        value = "-" if r[key] is None else f"{100 * r[key]:.1f}"
        lines.append(f"{r['class']:<{width}}  {r['videos']:>6}  {value:>6}")
    return "\n".join(lines)
