"""What the runtime and the training report, recomputed here by hand: the stream summary from its window records,
multi-label probabilities (sigmoid per class) and labels, the CSV rows, top-k accuracy and mAP."""

import csv
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cmdcl.data.video import RUNTIME_SAMPLING, read_clip, write_video
from cmdcl.model import CMDCL, save_checkpoint
from cmdcl.runtime import Recognizer, load_backend
from cmdcl.runtime.output import RecordWriter
from cmdcl.train.metrics import classification_report, mean_average_precision, topk_accuracy
from conftest import skew_priors, small_config

CLASSES = ["a", "b", "c", "d", "e"]


def noise_video(path, seed, n=40):
    """4 s at 10 fps of coloured noise with a moving bar: each window sees other frames."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 120, (n, 48, 64, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, (i * 2) % 56 : (i * 2) % 56 + 8] = (230, 40 + 5 * i, 90)
    return write_video(path, frames, rate=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A single-label and a multi-label checkpoint of the small test model, and a video."""
    d = tmp_path_factory.mktemp("summaries")
    out = {"video": noise_video(d / "v.mp4", 0)}
    for name, multi_label in (("single", False), ("multi", True)):
        torch.manual_seed(0)
        model = skew_priors(CMDCL(small_config(multi_label=multi_label), CLASSES)).eval()
        if multi_label:  # centre the logits on this video so that some labels are over 0.5 and some under
            clip = read_clip(out["video"], 4, 32, sampling=RUNTIME_SAMPLING)
            with torch.no_grad():
                logits = model(torch.from_numpy(clip.frames)[None])[0][0]
                model.logit_bias.sub_(logits.median() + 0.01)
        out[name] = save_checkpoint(model, d / f"{name}.pt")
    return out


def scores(record):
    return {entry["label"]: entry["score"] for entry in record["top"]}


@pytest.mark.parametrize("name", ["single", "multi"])
def test_stream_summary_is_the_mean_of_the_window_probabilities(files, name):
    """Every class reported (top_k = C, threshold 0): the summary's scores are the mean over the windows of the
    window scores, in decreasing order; with top_k = 2 the summary keeps the 2 best of that mean."""
    records = list(Recognizer(files[name], window=2.0, stride=0.5, top_k=len(CLASSES), threshold=0.0).stream(files["video"]))
    windows, summary = records[:-1], records[-1]
    assert summary["summary"] and not any(w.get("summary") for w in windows)
    assert summary["windows"] == len(windows) == 5
    mean = {c: sum(scores(w)[c] for w in windows) / len(windows) for c in CLASSES}
    assert [e["label"] for e in summary["top"]] == sorted(CLASSES, key=lambda c: -mean[c])
    assert scores(summary) == pytest.approx(mean, abs=2e-6)  # window scores are rounded to 1e-6
    assert summary["start"] == 0.0 and summary["end"] >= windows[-1]["end"]
    if name == "single":
        assert all(sum(scores(w).values()) == pytest.approx(1.0, abs=1e-5) for w in windows)
        best2 = Recognizer(files[name], window=2.0, stride=0.5, top_k=2).stream(files["video"])
        assert [e["label"] for e in list(best2)[-1]["top"]] == sorted(CLASSES, key=lambda c: -mean[c])[:2]


def test_multi_label_probabilities_are_per_class_sigmoids_and_labels_those_over_the_threshold(files):
    """Video mode on a multi-label model: each score is sigmoid(logit) of its own class (not a softmax), every
    label at or over 0.5 is reported whatever top_k, best first, and none under it."""
    from cmdcl.model import load_checkpoint

    model = load_checkpoint(files["multi"])
    clip = read_clip(files["video"], 4, 32, sampling=RUNTIME_SAMPLING)
    with torch.no_grad():
        logits = model(torch.from_numpy(clip.frames)[None])[0][0].double().numpy()
    expected = {c: 1.0 / (1.0 + math.exp(-x)) for c, x in zip(CLASSES, logits)}
    over = sorted((c for c in CLASSES if expected[c] >= 0.5), key=lambda c: -expected[c])
    assert 0 < len(over) < len(CLASSES), "the fixture should put some labels over 0.5 and some under"
    record = Recognizer(files["multi"], top_k=1).predict(files["video"])
    assert [e["label"] for e in record["top"]] == over
    assert scores(record) == pytest.approx({c: expected[c] for c in over}, abs=1e-5)
    everything = Recognizer(files["multi"], threshold=0.0).predict(files["video"])
    assert scores(everything) == pytest.approx(expected, abs=1e-5)
    assert sum(expected.values()) != pytest.approx(1.0, abs=1e-3)


def test_labels_at_the_threshold_are_kept_best_first_ties_in_class_order(files):
    probabilities = np.array([0.5, 0.2, 0.7, 0.5, 0.0])
    assert [e["label"] for e in Recognizer(files["multi"], threshold=0.5).top(probabilities)] == ["c", "a", "d"]
    assert [e["label"] for e in Recognizer(files["single"], top_k=2, threshold=0.5).top(probabilities)] == ["c", "a"]
    assert [e["label"] for e in Recognizer(files["single"], top_k=3).top(probabilities)] == ["c", "a", "d"]


def test_csv_rows_rank_the_labels_and_mark_the_summary(tmp_path):
    """One CSV row per reported label, ranked from 1, the summary's rows flagged; a record without labels one row."""
    window = {"video": "v.mp4", "start": 0.0, "end": 2.0, "top": [{"label": "c", "score": 0.7}, {"label": "a", "score": 0.2}]}
    summary = {"video": "v.mp4", "summary": True, "start": 0.0, "end": 4.0, "top": [{"label": "c", "score": 0.6}]}
    failure = {"video": "w.mp4", "summary": True, "error": "undecodable"}
    with RecordWriter(tmp_path / "out.csv", "csv") as writer:
        for record in (window, summary, failure):
            writer.write(record)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [(r["video"], r["summary"], r["rank"], r["label"], r["score"], r["end"], r["error"]) for r in rows] == [
        ("v.mp4", "False", "1", "c", "0.7", "2.0", ""), ("v.mp4", "False", "2", "a", "0.2", "2.0", ""),
        ("v.mp4", "True", "1", "c", "0.6", "4.0", ""), ("w.mp4", "True", "", "", "", "", "undecodable")]


def test_backend_probabilities_softmax_or_sigmoid(files):
    logits = np.array([[2.0, -1.0, 0.5, 0.0, -3.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    single, multi = load_backend(files["single"]), load_backend(files["multi"])
    e = np.exp(logits)
    np.testing.assert_allclose(single.probabilities(logits), e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(multi.probabilities(logits), 1 / (1 + np.exp(-logits)), rtol=1e-12)
    np.testing.assert_allclose(single.probabilities(logits + 1000.0), e / e.sum(axis=1, keepdims=True), rtol=1e-9)


# ---- training metrics ----------------------------------------------------------------
def hand_average_precision(scores, positives):
    """AP as the sum over decreasing score thresholds of (recall gained) x (precision at that threshold); tied
    scores form one threshold."""
    ap, recall_before = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        taken = [p for s, p in zip(scores, positives) if s >= t]
        recall = sum(taken) / sum(positives)
        ap += (recall - recall_before) * sum(taken) / len(taken)
        recall_before = recall
    return ap


def test_average_precision_by_hand_with_ties():
    # thresholds 0.9 (1 of 1 positive, recall 1/2) then 0.8 (2 of 3, recall 1): 1/2 * 1 + 1/2 * 2/3
    assert hand_average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.2, 0.5], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    m, per_class = mean_average_precision(scores, targets)
    assert per_class[0] == pytest.approx(5 / 6)
    # class 1: positives at 0.2 (tied with a negative at 0.2) and 0.2: one threshold over 0.7 (no positive)
    assert per_class[1] == pytest.approx(hand_average_precision([0.2, 0.2, 0.7, 0.2], [0, 1, 0, 1]))
    assert per_class[2] is None  # no positive: no AP, and left out of the mean
    assert m == pytest.approx((per_class[0] + per_class[1]) / 2)


def test_map_matches_sklearn_and_the_hand_formula_on_random_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 6, (30, 4), generator=g).float() / 5  # few distinct values: many ties
        targets = (torch.rand(30, 4, generator=g) < 0.3).long()
        targets[:, 3] = 0
        m, per_class = mean_average_precision(scores, targets)
        valid = []
        for c in range(3):
            if targets[:, c].any():
                want = hand_average_precision(scores[:, c].tolist(), targets[:, c].tolist())
                assert per_class[c] == pytest.approx(want)
                assert per_class[c] == pytest.approx(average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()))
                valid.append(want)
        assert per_class[3] is None and m == pytest.approx(sum(valid) / len(valid))
    m, per_class = mean_average_precision(torch.rand(3, 2), torch.zeros(3, 2))
    assert math.isnan(m) and per_class == [None, None]


def test_topk_accuracy_and_report_by_hand():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    targets = torch.tensor([1, 1, 2, 2])
    # best first: rows predict 1, 0, 2, 0 (top-1: rows 0 and 2); every target is in its row's best two
    assert topk_accuracy(scores, targets, 1) == pytest.approx(2 / 4)
    assert topk_accuracy(scores, targets, 2) == 1.0
    assert topk_accuracy(scores, targets, 5) == 1.0  # k over C counts every class
    report = classification_report(scores, targets, multi_label=False, classes=["x", "y", "z"])
    assert (report["top1"], report["top5"], report["videos"]) == (pytest.approx(2 / 4), 1.0, 4)
    # per-class accuracy is recall over the class's videos: x has none (None), y rows 0-1 (predicted y, x), z rows 2-3
    assert [(r["class"], r["videos"], r["accuracy"]) for r in report["per_class"]] == [
        ("x", 0, None), ("y", 2, 0.5), ("z", 2, 0.5)]
    report = classification_report(scores, torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]]), True, ["x", "y", "z"])
    assert report["mAP"] == pytest.approx(np.mean([hand_average_precision(scores[:, c].tolist(), t) for c, t in
                                                   enumerate([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])]))
    assert [r["videos"] for r in report["per_class"]] == [2, 1, 1]
