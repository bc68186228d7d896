"""Stream sampling recorded at training time (issue 15, item 1): train -> checkpoint -> ONNX -> sidecar -> runtime,
the median and its bounds, and the line cmdcl-run says about the windows it uses."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cmdcl.artifacts import read_sidecar, sidecar_path
from cmdcl.cli.run import main as run_cli
from cmdcl.data.datasets import load_dataset
from cmdcl.data.manifest import VideoDataset, VideoEntry
from cmdcl.data.synth import SynthConfig, generate
from cmdcl.data.video import write_video
from cmdcl.model import CMDCL, load_checkpoint, save_checkpoint
from cmdcl.model.config import sampling_problem
from cmdcl.runtime import Recognizer
from cmdcl.runtime.backends import ModelInfo, load_backend
from cmdcl.train import loop
from cmdcl.train.loop import TrainOptions, train
from conftest import small_config

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_recorded_sampling_survives_train_checkpoint_onnx_sidecar_and_runtime(tmp_path):
    from cmdcl.export import export_onnx
    from cmdcl.export.metadata import read_metadata

    manifest = generate(tmp_path / "train", 8, seed=0, cfg=SynthConfig(size=SIZE))
    # The generator's own account of each video's length (its last segment's end), not the files' headers.
    lengths = sorted(entry.segments[-1].end for entry in load_dataset(manifest).entries)
    median = (lengths[3] + lengths[4]) / 2
    assert lengths[0] < median < lengths[-1]  # the videos differ: a median, not a constant
    out = tmp_path / "model.pt"
    opts = TrainOptions(data=str(manifest), out=str(out), epochs=1, batch_size=4, frames=4, image_size=SIZE, text_init="random")
    train(opts, progress=False)

    sampling = load_checkpoint(out).checkpoint_extra["sampling"]
    assert sampling == {"num_frames": 4, "video": "uniform", "window_seconds": pytest.approx(median, abs=1e-6),
                        "stream_fps": pytest.approx(4 / median), "stride_frames": 2,
                        "clip_seconds": pytest.approx(median, abs=1e-6), "source": "median duration of 8 training videos"}
    onnx_path = export_onnx(load_checkpoint(out), tmp_path / "model.onnx")["full"]
    meta = read_metadata(onnx_path)
    assert {k: meta["sampling"][k] for k in sampling} == sampling
    # the engine sidecar is cmdcl-build's copy of this metadata (it needs TensorRT to build: written here as it writes it)
    engine = tmp_path / "model.plan"
    sidecar_path(engine).write_text(json.dumps({"metadata": meta, "batch_profile": {"min": 1, "opt": 1, "max": 1}}, default=str))
    infos = [ModelInfo.from_metadata(read_sidecar(engine)["metadata"])]
    for path in (onnx_path, out):
        with load_backend(path) as backend:
            infos.append(backend.info)
            recognizer = Recognizer(backend)
            assert (recognizer.window, recognizer.stride) == (pytest.approx(median), pytest.approx(median / 2))
    for info in infos:
        assert (info.window_seconds, info.stride_seconds) == (pytest.approx(median), pytest.approx(median / 2))


def fake_dataset(durations: dict) -> VideoDataset:
    return VideoDataset([VideoEntry(Path(name), [0]) for name in durations], ["a"], False, "fake.csv")


def sampling_of(monkeypatch, durations: dict, num_frames: int) -> tuple[dict | None, list]:
    """training_sampling over videos whose headers declare `durations` (None: no duration), and its warnings."""
    monkeypatch.setattr(loop, "declared_seconds", lambda path: durations[str(path)])
    warnings = []
    return loop.training_sampling(fake_dataset(durations), num_frames, warnings.append), warnings


def test_videos_without_a_duration_are_left_out_of_the_median_and_none_known_records_nothing(monkeypatch):
    sampling, warnings = sampling_of(monkeypatch, {"a.mp4": 3.0, "b.mp4": None, "c.mp4": 10.0, "d.mp4": 4.0}, 8)
    assert sampling["window_seconds"] == sampling["clip_seconds"] == 4.0  # median of 3, 4 and 10
    assert sampling["stream_fps"] == 2.0 and sampling["stride_frames"] == 4
    assert sampling["source"] == "median duration of 3 training videos"
    assert warnings == ["fake.csv: 1 of its 4 videos declare no duration; the stream sampling is the median of the other 3"]
    sampling, warnings = sampling_of(monkeypatch, {"a.mp4": None, "b.mp4": None}, 8)
    assert sampling is None
    assert warnings == ["fake.csv: none of its 2 videos declares its duration: no stream sampling recorded "
                        "(stream mode will use the defaults)"]


def test_a_median_too_short_for_the_grid_rate_is_clamped_a_ten_hour_one_kept(monkeypatch):
    # 64 frames in 0.02 s would be 3200 grid frames per second: raised to 64 / 1000 = 0.064 s
    sampling, warnings = sampling_of(monkeypatch, {"a.mp4": 0.02, "b.mp4": 0.02, "c.mp4": 5.0}, 64)
    assert sampling["window_seconds"] == sampling["clip_seconds"] == 0.064 and sampling["stream_fps"] == pytest.approx(1000.0)
    assert sampling["source"] == "median duration of 3 training videos (0.02 s, clamped)" and "0.064 s" in warnings[0]
    assert sampling_problem(sampling, 64) is None
    sampling, warnings = sampling_of(monkeypatch, {"a.mp4": 36000.0}, 8)  # one frame every 75 minutes
    assert warnings == [] and sampling["window_seconds"] == 36000.0 and sampling["stream_fps"] == 8 / 36000
    assert sampling_problem(sampling, 8) is None
    sampling, _ = sampling_of(monkeypatch, {"a.mp4": 1e9}, 1)  # a header claiming 31 years: at most a day
    assert sampling["window_seconds"] == 86400.0 and sampling_problem(sampling, 1) is None


def test_declared_seconds_reads_the_header_and_gives_none_for_what_it_cannot_read(tmp_path):
    video = write_video(tmp_path / "v.mp4", torch.zeros(25, 16, 16, 3, dtype=torch.uint8).numpy(), rate=10)
    assert loop.declared_seconds(video) == pytest.approx(2.5)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    assert loop.declared_seconds(tmp_path / "junk.mp4") is None


@pytest.mark.parametrize("change, problem", [
    ({"clip_seconds": float("nan")}, "sampling clip_seconds nan is not a number in [0.01, 86400]"),
    ({"clip_seconds": 1e6}, "sampling clip_seconds 1000000.0 is not a number"),
    ({"source": 5}, "sampling source 5 is not a string of at most 200 characters"),
    ({"source": "x" * 201}, "is not a string of at most 200 characters"),
])
def test_sampling_problem_bounds_clip_seconds_and_source(change, problem):
    good = {"num_frames": 8, "window_seconds": 5.0, "stream_fps": 1.6, "stride_frames": 4, "clip_seconds": 5.0,
            "source": "median duration of 280 training videos"}
    assert sampling_problem(good, 8) is None
    assert problem in sampling_problem({**good, **change}, 8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two copies of one small model (F = 4): without a recorded sampling, and with one of 3 s windows."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = CMDCL(small_config(), ["a", "b", "c"]).eval()
    recorded = {"num_frames": 4, "video": "uniform", "window_seconds": 3.0, "stream_fps": 4 / 3, "stride_frames": 2,
                "clip_seconds": 3.0, "source": "median duration of 5 training videos"}
    video = write_video(root / "v.mp4", torch.zeros(40, SIZE, SIZE, 3, dtype=torch.uint8).numpy(), rate=10)
    return save_checkpoint(model, root / "none.pt"), save_checkpoint(model, root / "recorded.pt", {"sampling": recorded}), video


@pytest.mark.parametrize("which, options, line", [
    ("none", [], "stream windows of 4 s every 2 s (no sampling recorded in the model: 4 frames at 1 frame/s)"),
    ("recorded", [], "stream windows of 3 s every 1.5 s (the model's training clips: median duration of 5 training videos)"),
    ("recorded", ["--window", "6"],
     "stream windows of 6 s every 1.5 s (--window; stride from the model's training clips: median duration of 5 training videos)"),
    ("none", ["--window", "2", "--stride", "1"], "stream windows of 2 s every 1 s (--window, --stride)"),
])
def test_cmdcl_run_says_once_which_windows_it_uses_and_why(checkpoints, which, options, line):
    none, recorded, video = checkpoints
    engine = none if which == "none" else recorded
    result = CliRunner().invoke(run_cli, [str(video), str(video), "--engine", str(engine), "--mode", "stream", *options])
    assert result.exit_code == 0, result.output
    assert [text for text in result.stderr.splitlines() if "stream windows" in text] == [f"cmdcl-run: {line}"]
    quiet = CliRunner().invoke(run_cli, [str(video), "--engine", str(engine), "--mode", "stream", "--quiet", *options])
    assert quiet.exit_code == 0 and "stream windows" not in quiet.stderr


def test_cmdcl_run_video_mode_says_nothing_about_windows(checkpoints):
    _, recorded, video = checkpoints
    result = CliRunner().invoke(run_cli, [str(video), "--engine", str(recorded), "--workers", "1"])
    assert result.exit_code == 0 and "stream windows" not in result.stderr
    assert math.isfinite(json.loads(result.stdout.splitlines()[0])["top"][0]["score"])
