"""Intervention diagnostics (cmdcl.train.diagnostics, cmdcl-eval --interventions): entropy and KL recomputed in numpy
from the model's parameters, attention that is uniform by construction, dictionary stand-ins that restore the model
bit for bit, a probe that reads a planted label and not a random one, and the command line."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdcl.cli.eval import main as eval_cli
from cmdcl.data.synth import ACTIVITIES, BACKGROUNDS, SynthConfig, generate
from cmdcl.model import CMDCL, save_checkpoint
from cmdcl.train.diagnostics import PROBE_FOLDS, format_diagnostics, intervention_diagnostics, probe_problem
from conftest import random_frames, skew_priors, small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def np_linear(layer, x):
    return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()


def np_softmax(scores):
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_attention(q, k, heads, log_prior=None):
    """softmax(q_h k_h^T / sqrt(d) + log prior) per head: q [..., L, D], k [K, D] -> [..., h, L, K]."""
    d = q.shape[-1] // heads
    qh = q.reshape(*q.shape[:-1], heads, d).swapaxes(-2, -3)  # [..., h, L, d]
    kh = k.reshape(k.shape[0], heads, d).transpose(1, 0, 2)  # [h, K, d]
    scores = qh @ kh.swapaxes(-1, -2) / math.sqrt(d)
    return np_softmax(scores + (0 if log_prior is None else log_prior))


def entropy_ratio_and_kl(weights, prior=None):
    """Mean entropy / log K and mean KL(weights || prior) over all rows, written out with numpy."""
    rows = weights.reshape(-1, weights.shape[-1])
    entropy = -(rows * np.log(np.where(rows > 0, rows, 1))).sum(axis=1)
    ratio = entropy.mean() / np.log(rows.shape[1])
    if prior is None:
        return ratio
    kl = (rows * (np.log(np.where(rows > 0, rows, 1)) - np.log(prior))).sum(axis=1)
    return ratio, kl.mean()


def np_tensor(t):
    return t.detach().double().numpy()


def test_entropy_and_kl_match_numpy_recomputed_from_the_parameters(make_model):
    model = make_model(num_classes=3)
    with torch.no_grad():  # sharper attentions than a new model's (whose T is 0.02 randn), far from their priors
        model.text.mul_(50)
        model.textual.q.weight.mul_(10)
        model.visual.q.weight.mul_(10)
    clips = random_frames(5, 4, 32, seed=1)
    report = intervention_diagnostics(model, clips, batch_size=2)  # batches of 2, 2, 1: the means weigh clips equally

    heads = model.cfg.heads
    text = np_linear(model.text_proj, np_tensor(model.text))
    textual = np_attention(np_linear(model.textual.q, text), np_linear(model.textual.k, np_tensor(model.bias_dict)), heads,
                           np.log(np_tensor(model.bias_prior)))
    ratio, kl = entropy_ratio_and_kl(textual, np_tensor(model.bias_prior))
    assert report["textual"]["entropy_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert report["textual"]["kl_to_prior"] == pytest.approx(kl, rel=1e-4)
    assert report["textual"]["kl_to_prior"] > 0.1

    with torch.no_grad():
        tokens = model.frame_tokens(clips.flatten(0, 1)).view(5, 4, 5, -1)
        x = np_tensor(model.contextualize(tokens))
        text_debiased = np_tensor(model.text_features())
    q = np_linear(model.visual.q, x)
    confounder = np_attention(q, np_linear(model.visual.k_conf, np_tensor(model.conf_dict)), heads, np.log(np_tensor(model.conf_prior)))
    mediator = np_attention(q, np_linear(model.visual.k_text, text_debiased), heads)
    ratio, kl = entropy_ratio_and_kl(confounder, np_tensor(model.conf_prior))
    assert report["visual"]["entropy_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert report["visual"]["kl_to_prior"] == pytest.approx(kl, rel=1e-4)
    assert report["visual"]["kl_to_prior"] > 0.1
    assert report["visual"]["mediator_entropy_ratio"] == pytest.approx(entropy_ratio_and_kl(mediator), rel=1e-5)

    rows = np_tensor(model.conf_dict)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    k = len(rows)
    assert report["visual"]["row_cosine"] == pytest.approx(((unit @ unit.T).sum() - k) / (k * (k - 1)))


def zero_queries(model):
    """Both interventions' query projections zeroed: every score is 0, so each attention is its prior (uniform
    without one)."""
    with torch.no_grad():
        for layer in (model.textual.q, model.visual.q):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def test_uniform_attention_by_construction_has_entropy_ratio_one_and_no_kl(make_model):
    model = zero_queries(make_model())
    kb, kz = len(model.bias_prior), len(model.conf_prior)
    model.set_dictionaries(model.bias_dict, torch.full((kb,), 1 / kb), model.conf_dict, torch.full((kz,), 1 / kz))
    report = intervention_diagnostics(model, random_frames(3, 4, 32))
    for part in (report["textual"], report["visual"]):
        assert part["entropy_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert part["kl_to_prior"] == pytest.approx(0.0, abs=1e-6)
    assert report["visual"]["mediator_entropy_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_attention_equal_to_a_skewed_prior_has_no_kl_and_the_priors_entropy(make_model):
    model = zero_queries(make_model())  # skewed priors: the attention is the prior itself
    report = intervention_diagnostics(model, random_frames(3, 4, 32))
    for part, prior in ((report["textual"], model.bias_prior), (report["visual"], model.conf_prior)):
        p = np_tensor(prior)
        assert part["kl_to_prior"] == pytest.approx(0.0, abs=1e-6)
        assert part["entropy_ratio"] == pytest.approx(-(p * np.log(p)).sum() / np.log(len(p)), rel=1e-5)
        assert part["entropy_ratio"] < 0.9


def test_dictionary_stand_ins_change_the_logits_as_a_full_forward_measures_and_the_model_is_restored_bit_exactly(make_model):
    model = make_model(num_classes=4).train()  # the diagnostics run in eval mode and give the mode back
    before = {name: t.clone() for name, t in model.state_dict().items()}
    clips = random_frames(6, 4, 32, seed=2)
    report = intervention_diagnostics(model, clips, seed=3)

    assert model.training
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        logits = model(clips)[0].double()
        saved = model.conf_dict.clone()
        order = torch.randperm(len(saved), generator=torch.Generator().manual_seed(3))  # the documented seeded order
        model.conf_dict.copy_(saved[order])
        shuffled = model(clips)[0].double()
        model.conf_dict.copy_(saved)
    relative = np.linalg.norm((shuffled - logits).numpy(), axis=1) / np.linalg.norm(logits.numpy(), axis=1)
    measured = report["visual"]["shuffled"]
    assert measured["relative_change"] == pytest.approx(relative.mean(), rel=1e-4)
    assert measured["max_relative_change"] == pytest.approx(relative.max(), rel=1e-4)
    assert measured["flips"] == int((shuffled.argmax(1) != logits.argmax(1)).sum())
    for part in ("textual", "visual"):
        for kind in ("shuffled", "replaced"):
            assert report[part][kind]["relative_change"] > 1e-4  # a random model depends on its dictionaries
            assert report[part][kind]["flip_share"] == report[part][kind]["flips"] / 6


def test_a_failure_midway_still_restores_the_dictionary(make_model, monkeypatch):
    model = make_model()
    saved = model.bias_dict.clone()
    head = model.head

    def failing_head(tokens):
        if not torch.equal(model.bias_dict, saved):
            raise RuntimeError("boom")
        return head(tokens)

    monkeypatch.setattr(model, "head", failing_head)
    with pytest.raises(RuntimeError, match="boom"):
        intervention_diagnostics(model, random_frames(2, 4, 32))
    assert torch.equal(model.bias_dict, saved)


@pytest.mark.parametrize("off", ["textual", "visual"])
def test_a_disabled_intervention_reports_off(make_model, off):
    report = intervention_diagnostics(make_model(**{f"{off}_intervention": False}), random_frames(2, 4, 32))
    assert report[off] is None
    on = "visual" if off == "textual" else "textual"
    assert report[on]["entropy_ratio"] is not None
    assert f"{off} (" in format_diagnostics(report) and ": off" in format_diagnostics(report)


def bright_and_dark_clips(n, seed=0):
    """n clips, alternately dark and bright (plus noise): label i % 2 is what the frames show."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 40, (n, 4, 32, 32, 3), generator=g)
    level = torch.tensor([20 if i % 2 == 0 else 190 for i in range(n)]).view(n, 1, 1, 1, 1)
    return (noise + level).to(torch.uint8), [i % 2 for i in range(n)]


def test_the_probe_reads_a_label_the_confounder_attention_carries_and_not_a_random_one(make_model):
    model = make_model()
    with torch.no_grad():
        model.visual.q.weight.mul_(20)  # sharp attention over Z: what the frames show moves it
    clips, labels = bright_and_dark_clips(20)
    planted = intervention_diagnostics(model, clips, labels)["visual"]["probe"]
    assert planted["attention_accuracy"] == 1.0 and planted["chance"] == 0.5 and planted["folds"] == PROBE_FOLDS

    shuffled = list(np.random.default_rng(0).permutation(labels))  # independent of the frames
    random = intervention_diagnostics(model, clips, shuffled)["visual"]["probe"]
    assert abs(random["attention_accuracy"] - random["chance"]) <= 0.2


def test_the_probe_reads_the_attention_not_the_tokens(make_model):
    """Zero queries: the attention over Z is the prior for every clip, so it carries no label, while the tokens do."""
    clips, labels = bright_and_dark_clips(20)
    probe = intervention_diagnostics(zero_queries(make_model()), clips, labels)["visual"]["probe"]
    assert probe["input_accuracy"] == 1.0
    assert probe["attention_accuracy"] <= probe["chance"]


@pytest.mark.parametrize("labels, reason", [
    (["a"] * 10, "at least 2 distinct labels"),
    (["a"] * 6 + ["b"] * 4, "'b' has 4"),
])
def test_the_probe_is_skipped_with_the_reason_when_labels_cannot_support_it(make_model, labels, reason):
    assert reason in probe_problem(labels)
    visual = intervention_diagnostics(make_model(), random_frames(len(labels), 2, 32), labels)["visual"]
    assert visual["probe"] is None and reason in visual["probe_skipped"]
    assert probe_problem(["a"] * 5 + ["b"] * 5) is None


# ---- the command line ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_split(tmp_path_factory):
    """10 small synth videos (2-frame model) and a checkpoint whose classes are the synth activities."""
    root = tmp_path_factory.mktemp("diag")
    manifest = generate(root / "data", 10, seed=0, split="test", cfg=SynthConfig(size=32))
    torch.manual_seed(0)
    model = skew_priors(CMDCL(small_config(num_frames=2), list(ACTIVITIES))).eval()
    return manifest, save_checkpoint(model, root / "m.pt")


def run_eval(manifest, checkpoint, *args):
    argv = ["--ckpt", str(checkpoint), "--data", str(manifest), "--workers", "1", "--device", "cpu", *map(str, args)]
    return CliRunner().invoke(eval_cli, argv)


def test_synth_writes_each_videos_background_next_to_the_manifest(synth_split):
    manifest, _ = synth_split
    with open(manifest.parent / "backgrounds.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(manifest, newline="") as f:
        videos = [row[0] for row in list(csv.reader(f))[1:]]
    assert rows[0] == ["video", "label"] and [r[0] for r in rows[1:]] == videos
    assert {r[1] for r in rows[1:]} <= {texture for _, texture in BACKGROUNDS}


def test_cli_prints_and_writes_the_diagnostics_with_the_backgrounds_as_probe_labels(synth_split, tmp_path):
    manifest, checkpoint = synth_split
    out = tmp_path / "r.json"
    result = run_eval(manifest, checkpoint, "--interventions", "--probe-labels", manifest.parent / "backgrounds.csv", "--json", out)
    assert result.exit_code == 0, result.output
    assert "textual (back-door): label texts over V_P" in result.output and "logits with Z" in result.output
    report = json.loads(out.read_text())["interventions"]
    assert report["clips"] == 10 and 0 < report["visual"]["entropy_ratio"] <= 1
    with open(manifest.parent / "backgrounds.csv", newline="") as f:
        counts = {}
        for _, label in list(csv.reader(f))[1:]:
            counts[label] = counts.get(label, 0) + 1
    # 10 videos over 7 backgrounds: too few per background; the reason names one with its count from the CSV
    assert report["visual"]["probe"] is None
    assert any(f"'{label}' has {n}" in report["visual"]["probe_skipped"] for label, n in counts.items())


def test_cli_runs_the_probe_on_the_labels_of_the_csv_in_the_manifests_order(synth_split, tmp_path):
    manifest, checkpoint = synth_split
    folder = manifest.parent.parent / "labels"  # a sibling of the data folder: paths are relative to the CSV's own folder
    folder.mkdir(exist_ok=True)
    labels = folder / "labels.csv"
    labels.write_text("video,label\n" + "".join(f"../data/test_{i:05d}.mp4,{'even' if i % 2 == 0 else 'odd'}\n" for i in range(10)))
    out = tmp_path / "r.json"
    result = run_eval(manifest, checkpoint, "--interventions", "--probe-labels", labels, "--json", out)
    assert result.exit_code == 0, result.output
    probe = json.loads(out.read_text())["interventions"]["visual"]["probe"]
    assert probe["labels"] == 2 and probe["chance"] == 0.5
    assert "accuracy (2 labels, 5-fold logistic regression)" in result.output
    assert "chance (the commonest label's share) 0.500" in result.output


@pytest.mark.parametrize("content, message", [
    ("path,label\n", ":1: the header must be 'video,label'"),
    ("video,label\ntest_00000.mp4\n", ":2: expected a video and a label"),
    ("video,label\nnope.mp4,a\n", ":2: video 'nope.mp4' is not among the evaluated videos"),
    ("video,label\ntest_00000.mp4,a\ntest_00000.mp4,b\n", ":3: video 'test_00000.mp4' is already listed on line 2"),
    ("video,label\ntest_00000.mp4,a\n", "no label for"),
])
def test_cli_bad_probe_label_files_fail_in_one_line_naming_the_file(synth_split, content, message):
    manifest, checkpoint = synth_split
    labels = manifest.parent / "bad-labels.csv"
    labels.write_text(content)
    try:
        result = run_eval(manifest, checkpoint, "--interventions", "--probe-labels", labels)
    finally:
        labels.unlink()
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(f"cmdcl-eval: error: {labels}") and message in result.output


@pytest.mark.parametrize("args, message", [
    (["--probe-labels", "x.csv"], "--probe-labels needs --interventions"),
    (["--interventions", "--mode", "stream"], "--interventions is for --mode video"),
])
def test_cli_option_misuse_is_a_usage_error(synth_split, args, message):
    manifest, checkpoint = synth_split
    result = run_eval(manifest, checkpoint, *args)
    assert result.exit_code == 2 and message in result.output


def test_cli_missing_probe_label_file_fails_in_one_line(synth_split, tmp_path):
    manifest, checkpoint = synth_split
    result = run_eval(manifest, checkpoint, "--interventions", "--probe-labels", tmp_path / "none.csv")
    assert result.exit_code == 1 and result.output == f"cmdcl-eval: error: {tmp_path / 'none.csv'}: no such probe-label file\n"


def test_synth_refuses_to_overwrite_a_backgrounds_csv_it_did_not_write(tmp_path):
    from cmdcl.cli.synth import main as synth_cli

    (tmp_path / "backgrounds.csv").write_text("someone else's\n")
    result = CliRunner().invoke(synth_cli, ["--out", str(tmp_path), "--videos", "1", "--size", "16"])
    assert result.exit_code == 1 and "backgrounds.csv, which is not from cmdcl-synth" in result.output
    assert (tmp_path / "backgrounds.csv").read_text() == "someone else's\n"
