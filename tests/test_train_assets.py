"""The bundled demo model and videos (cmdcl.assets)."""

import torch

from cmdcl import assets
from cmdcl.data.synth import ACTIVITIES
from cmdcl.data.video import read_clip
from cmdcl.model import load_checkpoint


def test_demo_checkpoint_and_videos():
    model = load_checkpoint(assets.demo_checkpoint())
    assert model.class_names == list(ACTIVITIES) and model.cfg.num_frames == 8
    assert assets.demo_checkpoint().stat().st_size < 8 * 2**20  # "a few MB"
    extra = model.checkpoint_extra
    assert extra["command"].startswith("cmdcl-train ") and extra["text_init"] == "clip"  # the mini-VLM's text side
    assert extra["frozen_vlm"].startswith("CLIP image tower from --clip-weights")
    assert 0.0 <= extra["metrics"]["val"]["top1"] <= 1.0
    assert abs(model.bias_prior.sum().item() - 1) < 1e-5 and abs(model.conf_prior.sum().item() - 1) < 1e-5
    clip = read_clip(assets.demo_video(), model.cfg.num_frames, model.cfg.vision.image_size)
    with torch.no_grad():
        probs = model.probabilities(model(torch.from_numpy(clip.frames)[None])[0])[0]
    assert model.class_names[probs.argmax()] == "fry egg"
    tea = read_clip(assets.demo_video("make tea"), model.cfg.num_frames, model.cfg.vision.image_size)
    assert tea.frames.shape == (8, 96, 96, 3)
    with torch.no_grad():  # on make juice's background: the first demo model (random frozen tower) said "make juice"
        assert model.class_names[model(torch.from_numpy(tea.frames)[None])[0].argmax()] == "make tea"
