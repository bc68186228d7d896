"""The bundled demo model gives the outputs pinned in tests/data/demo_logits.json (see its "about").

Parity tests compare a backend with the PyTorch model of the same code; these compare the code with what an earlier
commit computed, so a refactor that changes the model's maths, the decoding or the stream sampling shows here.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmdcl import assets
from cmdcl.artifacts import relative_error
from cmdcl.data.video import RUNTIME_SAMPLING, read_clip
from cmdcl.model import load_checkpoint
from cmdcl.runtime import Recognizer

PINNED = json.loads((Path(__file__).parent / "data" / "demo_logits.json").read_text())
TOLERANCE = 1e-4  # fp32 against the reference (docs/design.md section 7)
VIDEOS = {name: label for label, name in assets.DEMO_VIDEOS.items()}


@pytest.fixture(scope="module")
def demo_model():
    return load_checkpoint(assets.demo_checkpoint())


@pytest.mark.parametrize("sampling", ["keyframe", "exact"])
@pytest.mark.parametrize("name", list(VIDEOS))
def test_pytorch_reproduces_the_pinned_logits(demo_model, name, sampling):
    pinned = PINNED["video_mode"][name][sampling]
    clip = read_clip(assets.demo_video(VIDEOS[name]), demo_model.cfg.num_frames, demo_model.cfg.vision.image_size,
                     sampling=sampling)
    with torch.no_grad():
        logits = demo_model(torch.from_numpy(clip.frames)[None])[0][0].numpy()
    assert demo_model.class_names == PINNED["classes"]
    assert relative_error(logits, np.array(pinned["logits"])) <= TOLERANCE
    assert demo_model.class_names[int(logits.argmax())] == pinned["top1"]


def scores(record):
    """{label: score} of a record that lists every class."""
    return {entry["label"]: entry["score"] for entry in record["top"]}


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    from cmdcl.export import export_onnx

    path = tmp_path_factory.mktemp("demo") / "demo.onnx"  # the full graph; the split graphs go beside it
    export_onnx(load_checkpoint(assets.demo_checkpoint()), path)
    return path


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_runtime_reproduces_the_pinned_video_and_stream_records(backend, demo_onnx):
    """Video mode (the runtime's sampling) and stream mode (grid, window, stride from the checkpoint's sampling), on
    the checkpoint and on its ONNX export."""
    engine = assets.demo_checkpoint() if backend == "torch" else demo_onnx
    recognizer = Recognizer(engine, top_k=len(PINNED["classes"]))
    for name, label in VIDEOS.items():
        record = recognizer.predict(assets.demo_video(label))
        logits = np.array(PINNED["video_mode"][name][RUNTIME_SAMPLING]["logits"])
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = scores(record)
        assert [entry["label"] for entry in record["top"]][0] == PINNED["video_mode"][name][RUNTIME_SAMPLING]["top1"]
        assert relative_error([got[c] for c in PINNED["classes"]], expected) <= TOLERANCE

        records = list(recognizer.stream(assets.demo_video(label)))
        pinned = PINNED["stream_mode"][name]
        assert [(r["start"], r["end"], bool(r.get("summary"))) for r in records] == \
            [(r["start"], r["end"], bool(r.get("summary"))) for r in pinned]
        for got, want in zip(records, pinned):
            assert got["top"][0]["label"] == want["top"][0]["label"]
            got, want = scores(got), scores(want)
            assert relative_error([got[c] for c in PINNED["classes"]], [want[c] for c in PINNED["classes"]]) <= TOLERANCE


def test_demo_checkpoint_records_its_training_sampling_and_the_weights_the_logits_were_pinned_with(demo_model):
    """The median duration of its 280 training videos (cmdcl-synth --videos 280 --seed 0 --split train: 3.4-8.1 s,
    median 5.0 s), so stream windows of 5 s every 2.5 s; and the weights of the checkpoint retrained in issue 16
    (mini-VLM tower, fixed key projections), which tests/data/demo_logits.json was regenerated with."""
    from cmdcl.export.metadata import weights_hash

    assert demo_model.checkpoint_extra["sampling"] == {
        "num_frames": 8, "video": "uniform", "window_seconds": 5.0, "stream_fps": 1.6, "stride_frames": 4, "clip_seconds": 5.0,
        "source": "median duration of 280 training videos"}
    assert weights_hash(demo_model) == "a8f5beaa4e6c8999"
    assert demo_model.cfg.fixed_key_proj and "--clip-weights mini_vlm.pt" in demo_model.checkpoint_extra["command"]
    recognizer = Recognizer(assets.demo_checkpoint())
    assert (recognizer.window, recognizer.stride) == (5.0, 2.5)
