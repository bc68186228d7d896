"""cmdcl-run: record schema, formats, bad inputs and exit codes, optional outputs, crash safety."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import av
import pytest
from click.testing import CliRunner

from cmdcl.cli.run import main
from test_runtime import demo_assets, tiny_checkpoint, videos  # noqa: F401  (fixtures)
from test_video import BAD_FILES


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def check_top(top):
    assert isinstance(top, list)
    for entry in top:
        assert set(entry) == {"label", "score"} and isinstance(entry["label"], str) and 0.0 <= entry["score"] <= 1.0


def test_jsonl_schema_stream_mode(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    out = tmp_path / "out.jsonl"
    result = run([*videos[:2], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "2", "--stride", "1", "-o", out,
                  "--top-k", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    windows = [r for r in records if not r.get("summary")]
    summaries = [r for r in records if r.get("summary")]
    assert sorted(s["video"] for s in summaries) == sorted(str(v) for v in videos[:2])  # sources are read in parallel
    for r in windows:
        assert set(r) == {"video", "start", "end", "scale", "top", "window", "decode", "dropped", "latency_s"} and r["scale"] == 2.0
        assert 0 <= r["start"] < r["end"] and r["end"] - r["start"] == pytest.approx(2.0)
        assert len(r["top"]) == 2
        check_top(r["top"])
    for s in summaries:
        assert s["mode"] == "stream" and s["windows"] == 3 and s["start"] == 0.0 and s["end"] == pytest.approx(4.0)
        check_top(s["top"])


def test_video_mode_formats_and_debug(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    result = run([videos[0], "--engine", tiny_checkpoint, "-o", tmp_path / "out.json", "--debug"])
    assert result.exit_code == 0, result.output
    [record] = json.loads((tmp_path / "out.json").read_text())
    assert record["summary"] and record["mode"] == "video" and record["frames"] == 4
    check_top(record["top"])
    assert f"{videos[0]}: {record['strategy']} decoding, {record['frames_decoded']} frames decoded for 4 sampled" in result.output
    result = run([videos[0], "--engine", tiny_checkpoint, "-o", tmp_path / "out.csv", "--threshold", "0.2"])
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert rows and all(float(r["score"]) >= 0.2 and r["video"] == str(videos[0]) for r in rows)


def test_bad_inputs_do_not_stop_the_run(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    bad = {}
    for kind, (make, reason) in BAD_FILES.items():
        if kind == "directory":
            continue  # a directory is expanded to the videos in it
        (tmp_path / kind).mkdir()
        bad[kind] = (make(tmp_path / kind), reason)
    for mode in ("video", "stream"):
        inputs = [videos[0], *[path for path, _ in bad.values()], videos[1]]
        result = run([*inputs, "--engine", tiny_checkpoint, "--mode", mode, "-o", tmp_path / f"{mode}.jsonl", "--quiet"])
        assert result.exit_code == 3, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("cmdcl-run: ")]
        assert len(errors) == len(bad)
        if mode == "stream":  # sources are read side by side: their failures come in the order they happen
            errors = [next(line for line in errors if line.startswith(f"cmdcl-run: {path}: ")) for path, _ in bad.values()]
        for (path, reason), line in zip(bad.values(), errors):
            assert line.startswith(f"cmdcl-run: {path}: ") and reason in line.removeprefix(f"cmdcl-run: {path}: "), line
        records = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        good = [r["video"] for r in records if r.get("summary") and "error" not in r]
        assert (good if mode == "video" else sorted(good)) == [str(videos[0]), str(videos[1])]  # stream: in the order they end


def test_directory_input_and_exit_codes(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    result = run([videos[0].parent, "--engine", tiny_checkpoint, "--batch", "2"])
    assert result.exit_code == 0
    assert len([line for line in result.output.splitlines() if line.startswith("{")]) == 3
    result = run([videos[0], "--engine", tmp_path / "none.onnx"])
    assert result.exit_code == 1 and "none.onnx: no such file" in result.output
    assert run([videos[0], "--engine", tiny_checkpoint, "--top-k", "0"]).exit_code == 2
    assert run([videos[0], "--engine", tiny_checkpoint, "--window", "3"]).exit_code == 2  # needs --mode stream
    result = run([videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "1e-7"])  # > 1000 grid frames/s
    assert result.exit_code == 2 and "too short for" in result.output and "Traceback" not in result.output
    assert run([tmp_path / "nothing.mp4", "--engine", tiny_checkpoint]).exit_code == 3


def test_plot_and_overlay(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    plot, overlay = tmp_path / "timeline.png", tmp_path / "labelled.mp4"
    result = run([videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--window", "2", "--stride", "1",
                  "--plot", plot, "--overlay", overlay])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(overlay)) as container, av.open(str(videos[0])) as original:
        assert container.streams.video[0].frames == original.streams.video[0].frames == 40


def test_killed_run_leaves_only_valid_json_lines_and_the_older_output(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"  # records go to .partial until the run ends
    out.write_text('{"older": "run"}\n')
    script = "from cmdcl.cli.run import main; main()"
    args = [sys.executable, "-c", script, *map(str, videos * 30), "--engine", str(tiny_checkpoint), "--mode", "stream",
            "--window", "2", "--stride", "0.5", "-o", str(out), "-q"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None and (not partial.exists() or partial.read_text().count("\n") < 3):
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it was killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    lines = partial.read_text().splitlines()
    assert len(lines) >= 3
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert out.read_text() == '{"older": "run"}\n'


def test_default_engine_is_the_demo_model(tmp_path, monkeypatch):
    assets = demo_assets()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = run([assets.demo_video()])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.splitlines()[0])
    assert record["summary"] and record["top"]
    assert list((tmp_path / "cmdcl").glob("demo-*/model.head.onnx"))


def test_keyframe_sampling_and_keyframe_grid_are_the_defaults_and_can_be_turned_off(tiny_checkpoint, videos):  # noqa: F811
    """The test videos hold a keyframe every 1.2 s: each of the 4 one-second segments has one, and a 2 s grid step
    (a 4-frame window of 8 s) is longer than the GOP."""
    def records(*options):
        result = run([videos[0], "--engine", tiny_checkpoint, *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]

    [default] = records()
    [exact] = records("--sampling", "exact")
    assert default["keyframes"] == 4 and exact["keyframes"] == 0
    windows = [r for r in records("--mode", "stream", "--window", "8") if not r.get("summary")]
    every_frame = [r for r in records("--mode", "stream", "--window", "8", "--decode", "all") if not r.get("summary")]
    assert {r["decode"] for r in windows} == {"keyframes"} and {r["decode"] for r in every_frame} == {"all"}
    assert run([videos[0], "--engine", tiny_checkpoint, "--decode", "all"]).exit_code == 2  # needs --mode stream
