"""`cmdcl-export`: end to end from a checkpoint, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cmdcl.cli.export import main
from cmdcl.export.metadata import read_metadata
from cmdcl.model import save_checkpoint


@pytest.fixture
def checkpoint(make_model, tmp_path):
    return save_checkpoint(make_model(num_classes=3), tmp_path / "model.pt")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmdcl-export: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_export_writes_three_verified_graphs(checkpoint):
    result = run("--ckpt", checkpoint)
    assert result.exit_code == 0, result.output
    stem = checkpoint.with_suffix("")
    for path in (f"{stem}.onnx", f"{stem}.frame_encoder.onnx", f"{stem}.head.onnx"):
        assert f"{path}\n" in result.stdout
        assert read_metadata(path)["classes"] == ["class 0", "class 1", "class 2"]
    assert "model.onnx on random frames, batch 2: logits rel err" in result.stdout
    assert "frame_encoder + head on random frames" in result.stdout and "FAILED" not in result.stdout


def test_fp16_no_split_no_verify(checkpoint, tmp_path):
    out = tmp_path / "out" / "m16.onnx"
    out.parent.mkdir()
    result = run("--ckpt", checkpoint, "--out", out, "--precision", "fp16", "--no-split", "--no-verify")
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["precision"] == "fp16" and sorted(p.name for p in out.parent.iterdir()) == ["m16.onnx"]


def test_missing_and_corrupt_checkpoints(tmp_path):
    assert_one_line_error(run("--ckpt", tmp_path / "absent.pt"), "absent.pt", "no such file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a zip archive" * 4)
    assert_one_line_error(run("--ckpt", corrupt), "corrupt.pt", "not a readable torch checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    assert_one_line_error(run("--ckpt", other), "other.pt", "not a CMDCL checkpoint")


def test_unwritable_output_and_low_opset(checkpoint, tmp_path):
    assert_one_line_error(run("--ckpt", checkpoint, "--out", tmp_path / "missing" / "m.onnx"), "does not exist")
    assert_one_line_error(run("--ckpt", checkpoint, "--out", tmp_path), "is a directory")
    low = run("--ckpt", checkpoint, "--opset", "13")  # the exporter needs 17 (LayerNormalization as one op)
    assert low.exit_code == 2
    assert low.stderr.strip().splitlines()[-1] == "Error: Invalid value for '--opset': 13 is not in the range 17<=x<=20."


def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path):
    result = run("--ckpt", tmp_path / "absent.pt", "--debug")
    assert result.exit_code == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("cmdcl-export: error: ") and "no such file" in result.stderr


def test_engine_without_tensorrt_gpu_is_a_one_line_error(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --engine would really build (the GPU check script covers it)")
    result = run("--ckpt", checkpoint, "--no-split", "--no-verify", "--engine", checkpoint.with_suffix(".plan"))
    assert_one_line_error(result, "--engine:")


def test_help_explains_the_options():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--ckpt", "--out", "--opset", "--precision", "--split / --no-split", "--verify / --no-verify",
                   "--engine", "--max-batch", "--timing-cache", "--debug"):
        assert option in result.output


def test_verify_on_a_given_video(checkpoint, tmp_path):
    import numpy as np

    from cmdcl.data.video import write_video

    frames = np.zeros((16, 40, 48, 3), np.uint8)
    for t in range(16):
        frames[t, 8:24, 2 * t : 2 * t + 12] = 220
    video = write_video(tmp_path / "clip.mp4", frames, rate=8.0)
    result = run("--ckpt", checkpoint, "--no-split", "--video", video)
    assert result.exit_code == 0, result.output
    assert "model.onnx on video clip.mp4: logits rel err" in result.stdout and "[ok]" in result.stdout
    assert_one_line_error(run("--ckpt", checkpoint, "--video", tmp_path / "absent.mp4"), "absent.mp4", "no such video")


def test_failed_verification_fails_the_export_and_writes_no_file(checkpoint, monkeypatch):
    from cmdcl.export import verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", 0.0)  # fp32 ONNX Runtime is ~1e-7 off PyTorch, never 0
    result = run("--ckpt", checkpoint)
    assert_one_line_error(result, "disagree with PyTorch beyond rel err 0", "nothing written")
    assert not list(checkpoint.parent.glob("*.onnx"))
