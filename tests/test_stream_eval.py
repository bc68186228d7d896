"""cmdcl-eval --mode stream: window / summary top-1 and agreement recomputed by hand, segment mAP on a
hand-made case, table == --json, one-line errors, and stream == video mode on a video one window long."""

import json
import re
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdcl import assets
from cmdcl.cli.eval import main
from cmdcl.data.manifest import Segment, VideoDataset, VideoEntry, read_manifest
from cmdcl.data.synth import generate
from cmdcl.data.video import write_video
from cmdcl.model import CMDCL, save_checkpoint
from cmdcl.runtime import Recognizer
from cmdcl.train.stream_eval import StreamConfig, evaluate_stream, parse_configs
from conftest import skew_priors, small_config

# (window, stride) pairs of the CLI test, given as "--window 2 --window 4 --stride 1,2"
CONFIGS = [(2.0, 1.0), (4.0, 2.0)]


@pytest.fixture(scope="module")
def synth3(tmp_path_factory):
    """Three cmdcl-synth test videos (4.3-5.5 s, 96 px, the demo model's classes)."""
    return generate(tmp_path_factory.mktemp("synth3"), 3, seed=0, split="test")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def stream_report(synth3, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "stream.json"
    result = run("--mode", "stream", "--ckpt", assets.demo_checkpoint(), "--data", synth3, "--window", 2, "--window", 4,
                 "--stride", "1,2", "--workers", 1, "--json", out)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_stream_figures_match_a_hand_count_over_the_recognizers_records(synth3, stream_report):
    """Each video streamed alone and classified alone; hits counted by the records' first label."""
    _, report = stream_report
    dataset = read_manifest(synth3)
    labels = {str(e.path): dataset.classes[e.labels[0]] for e in dataset.entries}
    video = Recognizer(assets.demo_checkpoint(), sampling="exact", workers=1)
    video_top = {path: video.predict(path)["top"][0]["label"] for path in labels}
    assert report["videos"] == 3 and report["video_top1"] == pytest.approx(sum(video_top[p] == labels[p] for p in labels) / 3)
    assert [(c["window"], c["stride"]) for c in report["configs"]] == CONFIGS
    for (window, stride), figures in zip(CONFIGS, report["configs"]):
        recognizer = Recognizer(assets.demo_checkpoint(), window=window, stride=stride, sampling="exact", keyframe_grid=False,
                                workers=1)
        hits = windows = summary_hits = agree = 0
        for path, label in labels.items():
            *records, summary = recognizer.stream(path)
            windows += len(records)
            hits += sum(r["top"][0]["label"] == label for r in records)
            summary_hits += summary["top"][0]["label"] == label
            agree += summary["top"][0]["label"] == video_top[path]
        assert figures["windows"] == windows
        assert figures["window_top1"] == pytest.approx(hits / windows)
        assert figures["summary_top1"] == pytest.approx(summary_hits / 3)
        assert figures["agreement"] == pytest.approx(agree / 3)
    # the two window lengths do not score alike on these videos (else this test could not tell them apart)
    assert report["configs"][0]["window_top1"] != report["configs"][1]["window_top1"]


def test_stream_table_shows_the_json_figures(stream_report):
    output, report = stream_report
    lines = output.strip().splitlines()
    assert lines[0].split()[:4] == ["videos", "3", "classes", "7"]
    assert float(lines[0].split()[-1]) == pytest.approx(100 * report["video_top1"], abs=0.005)
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == len(report["configs"])
    for row, c in zip(rows, report["configs"]):
        expected = [c["window"], c["stride"], c["windows"], 100 * c["window_top1"], 100 * c["summary_top1"], 100 * c["agreement"]]
        assert [float(x) for x in row] == pytest.approx(expected, abs=0.005)


class FakeRecognizer:
    """Records written by hand: two classes A, B; every record lists both."""

    info = types.SimpleNamespace(classes=["A", "B"])

    def __init__(self, window, stride, streams, videos):
        self.window, self.stride, self.streams, self.videos = window, stride, streams, videos

    @staticmethod
    def top(a, b):
        return [{"label": "A", "score": a}, {"label": "B", "score": b}]

    def predict_many(self, paths):
        for path in paths:
            yield {"video": path, "summary": True, "top": self.top(*self.videos[path])}

    def stream_many(self, paths):
        for path in paths:
            for start, end, a, b in self.streams[path]:
                yield {"video": path, "start": start, "end": end, "top": self.top(a, b)}
            yield {"video": path, "summary": True, "top": self.top(0.5, 0.4)}


def test_segments_map_scores_each_window_against_the_segments_it_overlaps():
    """Segments A [0, 2] and B [2, 4]. Windows [0,1] -> {A}; [1,3] -> {A,B}; [2,3] -> {B} (it only touches A's end);
    [3,4] -> {B}. By hand: A's scores .9+ .5- .2+ .1- give AP (1 + 2/3) / 2 = 5/6; B's .8+ .6+ .3- .2+ give
    (1 + 1 + 3/4) / 3 = 11/12; mAP 7/8 (counting [2,3] as an A window would make A's AP 1)."""
    dataset = VideoDataset([VideoEntry("v", [0, 1], [Segment(0.0, 2.0, "A"), Segment(2.0, 4.0, "B")])], ["A", "B"], True, "hand")
    streams = {"v": [(0.0, 1.0, 0.9, 0.3), (1.0, 3.0, 0.2, 0.8), (2.0, 3.0, 0.5, 0.6), (3.0, 4.0, 0.1, 0.2)]}
    videos = {"v": (0.3, 0.7)}  # video mode's top-1: B; the summary's (0.5, 0.4): A

    def make(window, stride):
        return FakeRecognizer(window or 4.0, stride or 2.0, streams, videos)

    report = evaluate_stream(make, dataset, [StreamConfig(4.0, None)], target="segments")
    (figures,) = report["configs"]
    assert figures["windows"] == 4
    assert figures["window_mAP"] == pytest.approx(7 / 8)
    assert figures["agreement"] == 0.0
    assert figures["summary_mAP"] == pytest.approx(1.0) and report["video_mAP"] == pytest.approx(1.0)  # both classes positive


@pytest.mark.parametrize("entry, multi_label, target, message", [
    (VideoEntry("v", [0], [Segment(0.0, 1.0, "C")], "m.csv:2"), True, "segments",
     "m.csv:2: segment 'C' is not among the model's 2 classes"),
    (VideoEntry("v", [0], []), True, "segments", "hand: no video has annotated segments"),
    (VideoEntry("v", [0, 1], []), True, "label", "hand: videos with several labels; stream evaluation scores windows against one"),
])
def test_data_the_model_cannot_score_is_refused_in_one_line(entry, multi_label, target, message):
    """Dataset folders (Breakfast, COIN) keep activity labels whatever --target says: their segments are checked here."""
    dataset = VideoDataset([entry], ["A", "B"], multi_label, "hand")
    with pytest.raises(ValueError, match="^" + re.escape(message)) as info:
        evaluate_stream(lambda w, s: FakeRecognizer(w, s, {}, {}), dataset, [StreamConfig(1.0, None)], target)
    assert "\n" not in str(info.value)


def test_parse_configs_pairs_windows_with_strides():
    assert parse_configs([2, 4, 8], [1]) == [StreamConfig(2.0, 1.0), StreamConfig(4.0, 1.0), StreamConfig(8.0, 1.0)]
    assert parse_configs([2, 4], [1, 3]) == [StreamConfig(2.0, 1.0), StreamConfig(4.0, 3.0)]
    assert parse_configs([2], []) == [StreamConfig(2.0, None)]
    assert parse_configs([], []) == [StreamConfig(None, None)]


@pytest.mark.parametrize("args, message", [
    (["--window", "nan"], "Invalid value for '--window': expected seconds like 8 or 8,32, got 'nan': 'nan' is not a number"),
    (["--window", "4", "--stride", "1e300"], "Invalid value for '--stride': expected seconds like 8 or 8,32, got '1e300': 1e+300 is not in "
                                             "the range 0<x<=86400"),
    (["--window", "2,,4"], "got '2,,4': an empty item"),
    (["--window", "0.001"], "window 0.001 s is too short for 8 frames"),  # checked once the model is loaded
    (["--window", "2,x"], "expected seconds like 8 or 8,32, got '2,x'"),
    (["--window", "2", "--window", "4,8", "--stride", "1,2"], "--stride: 2 strides for 3 windows"),  # repeated and comma lists
    (["--window", ",".join(["1"] * 17)], "--window: at most 16 values"),
    (["--window", "2,4,8", "--stride", "1,2"], "--stride: 2 strides for 3 windows"),
])
def test_bad_windows_are_usage_errors(synth3, args, message):
    result = run("--mode", "stream", "--ckpt", assets.demo_checkpoint(), "--data", synth3, *args)
    assert result.exit_code == 2 and message in result.output


def test_window_options_need_stream_mode(synth3):
    result = run("--ckpt", assets.demo_checkpoint(), "--data", synth3, "--window", "4")
    assert result.exit_code == 2 and "--window and --stride need --mode stream" in result.output


@pytest.mark.parametrize("args, message", [
    (["--target", "segments"], "unknown label 'crack egg' (not in the 7 classes)"),  # the demo model's classes are activities
])
def test_data_or_windows_the_model_cannot_score_fail_in_one_line(synth3, args, message):
    result = run("--mode", "stream", "--ckpt", assets.demo_checkpoint(), "--data", synth3, "--workers", 1, *args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("cmdcl-eval: error: ") and message in result.output


def test_stream_and_video_mode_agree_on_a_video_one_window_long(tmp_path):
    """F = 4 frames at 2 fps: a 2 s video, each frame on screen for one of video mode's four 0.5 s segments, so
    video mode's segment centres (0.25, 0.75, ... s) show frames 0-3; a 2 s window's grid (F / 2 s = 2 per second,
    t = 0, 0.5, 1, 1.5 s) shows the same four frames. One stream window, whose probabilities (frame encoder + head)
    equal video mode's (full graph). The frames differ (random), so any other choice of frames would show."""
    torch.manual_seed(0)
    model = skew_priors(CMDCL(small_config(), [f"class {i}" for i in range(5)])).eval()
    checkpoint = save_checkpoint(model, tmp_path / "m.pt")
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = write_video(tmp_path / "one_window.mp4", frames, rate=2)
    recognizer = Recognizer(checkpoint, window=2.0, top_k=5, sampling="exact", keyframe_grid=False, workers=1)
    *windows, summary = recognizer.stream(path)
    video = recognizer.predict(path)
    assert len(windows) == 1 and (windows[0]["start"], windows[0]["end"]) == (0.0, 2.0) and video["end"] == 2.0

    def scores(record):
        return dict((e["label"], e["score"]) for e in record["top"])

    stream_scores, video_scores = scores(windows[0]), scores(video)
    assert stream_scores.keys() == video_scores.keys()
    assert [stream_scores[k] for k in video_scores] == pytest.approx(list(video_scores.values()), abs=1e-5)
    # and the frames matter: a window over the first second only (frames 0-1, each twice) scores otherwise
    half = Recognizer(checkpoint, window=1.0, top_k=5, sampling="exact", keyframe_grid=False, workers=1)
    first = next(iter(half.stream(path)))
    assert max(abs(scores(first)[k] - v) for k, v in video_scores.items()) > 1e-3


def test_segments_cli_matches_average_precision_over_the_recognizers_windows(synth3, tmp_path):
    """A model whose classes are the atomic actions: each window's targets are the actions on screen during it,
    scored with scikit-learn's average precision per action (only those with a positive), averaged."""
    from sklearn.metrics import average_precision_score

    actions = (synth3.parent / "actions.txt").read_text().split("\n")[:-1]
    torch.manual_seed(1)
    checkpoint = save_checkpoint(skew_priors(CMDCL(small_config(), actions)).eval(), tmp_path / "actions.pt")
    out = tmp_path / "segments.json"
    result = run("--mode", "stream", "--ckpt", checkpoint, "--data", synth3, "--target", "segments", "--window", 2, "--stride", 1,
                 "--workers", 1, "--json", out)
    assert result.exit_code == 0, result.output
    (figures,) = json.loads(out.read_text())["configs"]
    recognizer = Recognizer(checkpoint, window=2, stride=1, top_k=len(actions), sampling="exact", keyframe_grid=False, workers=1)
    rows, targets = [], []
    for entry in read_manifest(synth3, actions, "segments").entries:
        for record in list(recognizer.stream(entry.path))[:-1]:
            scores = {e["label"]: e["score"] for e in record["top"]}
            rows.append([scores[a] for a in actions])
            targets.append([any(s.name == a and s.start < record["end"] and record["start"] < s.end for s in entry.segments)
                            for a in actions])
    rows, targets = np.array(rows), np.array(targets)
    aps = [average_precision_score(targets[:, c], rows[:, c]) for c in range(len(actions)) if targets[:, c].any()]
    assert figures["windows"] == len(rows) and figures["window_mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert 0 < targets.sum(axis=1).min() and targets.sum(axis=1).max() == 2  # windows that span one action, and two


def test_json_report_writes_a_metric_without_positives_as_null(tmp_path):
    from cmdcl.output_files import write_json

    path = tmp_path / "r.json"
    write_json(path, {"mAP": float("nan"), "configs": [{"window_mAP": float("nan"), "windows": 3}], "top1": 0.5})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == {
        "mAP": None, "configs": [{"window_mAP": None, "windows": 3}], "top1": 0.5}
