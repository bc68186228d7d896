"""Multi-scale stream windows (issue 15, item 3): one grid at the shortest window's rate, each grid frame encoded
once, each longer scale's F tokens taken from the ring buffer at the centres of F equal segments of its span."""

import csv
import itertools
import json

import numpy as np
import pytest

from cmdcl.artifacts import window_positions, window_scales
from cmdcl.data.video import iter_grid_frames
from cmdcl.runtime import Recognizer
from cmdcl.runtime.backends import TorchBackend
from test_cli_run import run
from test_runtime import CountingBackend, assert_same_records, scores, tiny_checkpoint, videos  # noqa: F401  (fixtures)
from test_stream_reliability import EchoBackend, finishes_within, jumping_mkv

GRID = 4.0  # grid frames per second of a 1 s window of F = 4 frames


def test_window_positions_are_the_centres_of_f_equal_segments():
    # by hand: floor((j + 0.5) * span / F)
    assert window_positions(4, 4) == [0, 1, 2, 3]  # the shortest scale: every frame, as a single-scale window
    assert window_positions(4, 9) == [1, 3, 5, 7]  # 1.125, 3.375, 5.625, 7.875
    assert window_positions(4, 12) == [1, 4, 7, 10]  # 1.5, 4.5, 7.5, 10.5
    assert window_positions(4, 2) == [0, 0, 1, 1]  # a part shorter than a window repeats frames
    assert window_positions(8, 32) == [2, 6, 10, 14, 18, 22, 26, 30]


def test_window_scales_sorted_unique_and_bounded():
    assert window_scales(8, 8) == (8.0,)
    assert window_scales([32, 8, 8.0, 16], 8) == (8.0, 16.0, 32.0)
    assert window_scales([1, 512], 8) == (1.0, 512.0)  # 4096 grid frames: the most the ring keeps
    for bad, message in [([], "1 to 8 different"), (list(range(1, 10)), "not 9"), ([8, float("nan")], "positive"),
                         ([8, -1], "positive"), ([8, float("inf")], "positive"), (["x"], "not a number"),
                         ([1, 513], "4104 grid frames; at most 4096"), ([1e-5, 1], "too short"),
                         ([8, 8.01], "8 s and 8.01 s both span 8 grid frames")]:
        with pytest.raises(ValueError, match=message):
            window_scales(bad, 8)


def test_scales_equal_single_scale_runs_and_the_head_on_their_positions(tiny_checkpoint, videos):  # noqa: F811
    """Windows 1, 2.25 and 3 s of F = 4 frames (spans of 4, 9 and 12 grid frames at 4 per second), a step of 2 grid
    frames, over a 4 s video. The 1 s windows are the single-scale run's; a longer scale's window is the head on the
    tokens at the centres of its span's 4 segments (positions worked out by hand below), each grid frame encoded once."""
    counting = CountingBackend(tiny_checkpoint)
    records = list(Recognizer(counting, window=[2.25, 1.0, 3.0, 1.0], stride=0.5).stream(videos[0]))
    single = list(Recognizer(TorchBackend(tiny_checkpoint), window=1.0, stride=0.5).stream(videos[0]))

    times, frames = zip(*iter_grid_frames(videos[0], GRID, counting.info.image_size))  # the same grid, read independently
    assert len(frames) == 16
    assert counting.encoded_frames == len(frames)  # every grid frame once, whatever the scales
    shortest = [r for r in records if r.get("scale") == 1.0]
    assert_same_records(shortest, single)  # windows and summary of the 1 s scale: exactly the single-scale run
    assert counting.head_calls == len(single) - 1  # one head call per stride step, all scales' windows in it

    reference = TorchBackend(tiny_checkpoint)
    tokens = reference.encode_frames(np.stack(frames))
    for scale, span, positions, ends in [(2.25, 9, [1, 3, 5, 7], [9, 11, 13, 15]), (3.0, 12, [1, 4, 7, 10], [11, 13, 15])]:
        windows = [r for r in records if r.get("scale") == scale and not r.get("summary")]
        assert [w["window"] for w in windows] == list(range(len(ends)))  # a window at every step once its span has filled
        for window, end in zip(windows, ends):
            first = end - span + 1
            assert (window["start"], window["end"]) == (round(times[first], 3), round(times[end] + 1 / GRID, 3))
            picked = tokens[[first + p for p in positions]]
            probabilities = reference.probabilities(reference.classify_tokens(picked[None]))[0]
            assert scores(window) == pytest.approx({c: float(p) for c, p in zip(reference.info.classes, probabilities)}, abs=1e-5)
    assert counting.head_windows == len(single) - 1 + 4 + 3

    summaries = [r for r in records if r.get("summary")]
    assert records[-3:] == summaries and [s["scale"] for s in summaries] == [1.0, 2.25, 3.0]  # after the last window
    for summary in summaries:
        windows = [scores(r) for r in records if r.get("scale") == summary["scale"] and not r.get("summary")]
        mean = {label: np.mean([w[label] for w in windows]) for label in windows[0]}
        assert summary["windows"] == len(windows) and scores(summary) == pytest.approx(mean, abs=2e-6)


def test_a_source_shorter_than_a_scale_has_no_window_of_it(tiny_checkpoint, videos):  # noqa: F811
    records = list(Recognizer(tiny_checkpoint, window=[1.0, 8.0], stride=0.5).stream(videos[0]))  # 4 s < 8 s
    assert {r["scale"] for r in records if not r.get("summary")} == {1.0}
    short, long = [r for r in records if r.get("summary")]
    assert short["windows"] == 7 and (long["scale"], long["windows"], long["top"]) == (8.0, 0, []) and "error" not in long


def test_a_gap_restarts_every_scale(tmp_path):
    path = jumping_mkv(tmp_path / "jump.mkv")  # 3 s, a jump of 100,000 s, 3 s
    recognizer = Recognizer(EchoBackend(), window=[2.0, 3.0], stride=0.5)  # grid 2 per second; spans 4 and 6 grid frames
    records = finishes_within(20, lambda: list(itertools.islice(recognizer.stream(path), 1000)))
    for scale in (2.0, 3.0):
        windows = [r for r in records if r.get("scale") == scale and not r.get("summary")]
        before = [w for w in windows if w["end"] < 100_000]
        after = [w for w in windows if w["start"] > 100_000]
        assert before and after and len(before) + len(after) == len(windows)  # no window spans the gap
        assert after[0]["start"] == 100_003.0 and after[0]["gap_before"] == pytest.approx(100_000.0)  # ring empty after it
        assert all("gap_before" not in w for w in windows if w is not after[0])
        assert all(w["end"] - w["start"] == pytest.approx(scale) for w in windows)
    summaries = [r for r in records if r.get("summary")]
    assert [(s["scale"], s["gaps"]) for s in summaries] == [(2.0, 1), (3.0, 1)]


def test_cli_several_windows(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    out = tmp_path / "out.jsonl"
    plot = tmp_path / "timeline.png"
    result = run([videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "3,1", "--stride", "0.5", "-o", out,
                  "--plot", plot])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one line per label and scale
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["scale"] for r in records} == {1.0, 3.0} and [r["scale"] for r in records if r.get("summary")] == [1.0, 3.0]
    result = run([videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "1,3", "--stride", "0.5",
                  "-o", tmp_path / "out.csv"])
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert result.exit_code == 0 and {r["scale"] for r in rows} == {"1.0", "3.0"}


def test_cli_a_failed_source_is_one_failure_whatever_the_scales(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    result = run([bad, videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "1,2,3", "-o", tmp_path / "o.jsonl", "-q"])
    assert result.exit_code == 3, result.output  # one stderr line for it, not one per scale
    assert [line for line in result.output.splitlines() if str(bad) in line] == [f"cmdcl-run: {bad}: not a video "
                                                                                 f"(Invalid data found when processing input)"]


@pytest.mark.parametrize("window, message", [
    ("", "expected seconds"), ("1,,2", "an empty item"), ("1,x", "expected seconds"), ("nan", "'nan' is not a number"),
    ("1,-2", "-2.0 is not in the range 0<x<=86400"), ("0", "0.0 is not in the range 0<x<=86400"),
    (",".join(str(i) for i in range(1, 10)), "1 to 8 different"),
    ("0.01,100", "40000 grid frames; at most 4096"),
])
def test_cli_bad_windows_are_one_line_usage_errors(tiny_checkpoint, videos, window, message):  # noqa: F811
    result = run([videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", window])
    assert result.exit_code == 2 and message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_cli_several_windows_need_stream_mode(tiny_checkpoint, videos):  # noqa: F811
    result = run([videos[0], "--engine", tiny_checkpoint, "--window", "1,3"])
    assert result.exit_code == 2 and "need --mode stream" in result.output
