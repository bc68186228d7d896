"""The synthetic benchmark: real H.264 files, a valid manifest, shared atomic actions, the confounder."""

import collections

import numpy as np
import pytest
from click.testing import CliRunner

from cmdcl.cli.synth import main as synth_cli
from cmdcl.data.manifest import read_manifest
from cmdcl.data.synth import ACTIVITIES, ATOMIC_ACTIONS, BACKGROUNDS, SynthConfig, choose_background, generate, render_video
from cmdcl.data.video import open_video, read_clip


def test_every_atomic_action_is_shared_by_several_activities():
    uses = collections.Counter(a for steps in ACTIVITIES.values() for a in steps)
    assert set(uses) == set(ATOMIC_ACTIONS)
    assert min(uses.values()) >= 2  # the cross-modal bias: no action identifies an activity
    assert len(BACKGROUNDS) == len(ACTIVITIES)


def test_generate_writes_h264_and_manifest(tmp_path):
    manifest = generate(tmp_path, 9, seed=3, split="train", cfg=SynthConfig(size=32))
    data = read_manifest(manifest)
    assert data.classes == list(ACTIVITIES) and len(data.entries) == 9
    assert sorted(e.labels[0] for e in data.entries) == sorted(np.arange(9) % 7)  # balanced
    container, stream = open_video(data.entries[0].path)
    with container:
        assert stream.codec_context.name == "h264" and stream.width == 32
    for entry in data.entries[:3]:
        steps = ACTIVITIES[data.classes[entry.labels[0]]]
        assert [s.name for s in entry.segments] == steps  # ordered atomic actions
        clip = read_clip(entry.path, 4, 32)
        assert clip.frames.shape == (4, 32, 32, 3)
        assert clip.duration == pytest.approx(entry.segments[-1].end, abs=0.11)
    actions = read_manifest(manifest, target="segments")
    assert actions.classes == list(ATOMIC_ACTIONS) and actions.multi_label


def test_same_seed_same_videos_and_splits_differ(tmp_path):
    a = read_manifest(generate(tmp_path / "a", 4, seed=1, split="test", cfg=SynthConfig(size=32)))
    b = read_manifest(generate(tmp_path / "b", 4, seed=1, split="test", cfg=SynthConfig(size=32)))
    frames = lambda entry: read_clip(entry.path, 6, 32).frames  # noqa: E731
    assert [e.segments for e in a.entries] == [e.segments for e in b.entries]
    # Rendering is seeded; threaded x264 is not bit-exact, so compare decoded pixels loosely.
    assert all(np.abs(frames(x).astype(int) - frames(y)).mean() < 2 for x, y in zip(a.entries, b.entries))
    c = read_manifest(generate(tmp_path / "c", 4, seed=1, split="ood", cfg=SynthConfig(size=32)))
    assert [e.segments for e in a.entries] != [e.segments for e in c.entries]


def test_background_confounder_correlates_in_train_not_in_ood():
    rng = np.random.default_rng(0)
    home = {split: np.mean([choose_background(i % 7, split, 0.8, rng) == i % 7 for i in range(4000)]) for split in ("train", "ood")}
    assert home["train"] == pytest.approx(0.8 + 0.2 / 7, abs=0.03)
    assert home["ood"] == pytest.approx(1 / 7, abs=0.03)


def test_background_is_visible_in_frames():
    cfg = SynthConfig(size=32)
    a, _ = render_video("make tea", 0, cfg, np.random.default_rng(0))
    b, _ = render_video("make tea", 2, cfg, np.random.default_rng(0))
    corner = lambda frames: frames[:, :4, :4].reshape(-1, 3).mean(axis=0)  # noqa: E731
    assert np.abs(corner(a) - corner(b)).max() > 20


def test_cli(tmp_path):
    result = CliRunner().invoke(synth_cli, ["--out", str(tmp_path), "--videos", "2", "--size", "32", "--split", "ood"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "manifest.csv").is_file() and (tmp_path / "actions.txt").is_file()
    bad = CliRunner().invoke(synth_cli, ["--out", str(tmp_path), "--videos", "2", "--size", "33"])
    assert bad.exit_code == 1 and "size must be even" in bad.output and "Traceback" not in bad.output


def test_cli_reruns_over_its_own_interrupted_output(tmp_path, monkeypatch):
    """A run stopped after some videos (Ctrl-C) left videos but not yet actions.txt, which marks the folder as
    cmdcl-synth's: the rerun refused the folder as "not from cmdcl-synth". The marker is written first."""
    import cmdcl.data.synth as synth

    written = []

    def write_then_stop(path, frames, rate):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.write_bytes(b"video"))

    monkeypatch.setattr(synth, "write_video", write_then_stop)
    interrupted = CliRunner().invoke(synth_cli, ["--out", str(tmp_path), "--videos", "4", "--size", "32"])
    assert interrupted.exit_code == 130 and (tmp_path / "train_00000.mp4").exists()
    monkeypatch.undo()
    rerun = CliRunner().invoke(synth_cli, ["--out", str(tmp_path), "--videos", "4", "--size", "32"])
    assert rerun.exit_code == 0, rerun.output
    assert len(read_manifest(tmp_path / "manifest.csv").entries) == 4
