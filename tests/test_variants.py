"""Intervention variants (docs/design.md 2.10): what only the formulas in test_equations.py cannot show — which
parameters learn, what the config and cmdcl-train accept, and that default checkpoints keep their layout."""

import pytest
import torch
from click.testing import CliRunner

from cmdcl.cli.train import main as train_cli
from cmdcl.data.synth import SynthConfig, generate
from cmdcl.model import CMDCL, load_checkpoint
from cmdcl.model.interventions import normalise_rows
from cmdcl.train.loop import TrainOptions, param_groups
from conftest import random_frames, small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY_WEIGHTS = ("textual.k.weight", "textual.k.bias", "visual.k_conf.weight", "visual.k_conf.bias")


def one_step(model):
    """One AdamW step of the training loop's parameter groups on a random batch; the parameters before it."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, TrainOptions(data="-", out="-")))
    logits, _ = model(random_frames(2, model.cfg.num_frames, model.cfg.vision.image_size))
    model.loss(logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("fixed", [True, False])
def test_fixed_key_projections_keep_their_weights_and_the_temperature_learns(fixed):
    torch.manual_seed(0)
    model = CMDCL(small_config(fixed_key_proj=fixed, learn_temperature=True), ["a", "b", "c"]).train()
    before = one_step(model)
    params = dict(model.named_parameters())
    for name in KEY_WEIGHTS:
        assert torch.equal(params[name], before[name]) is fixed, name
    for name in ("textual.q.weight", "visual.q.weight", "textual.k.log_temperature", "visual.k_conf.log_temperature"):
        assert not torch.equal(params[name], before[name]), name


def test_whitened_rows_have_unit_variance_along_every_direction_they_span():
    rows = torch.randn(20, 6) @ torch.randn(6, 24) + 3.0  # 20 rows in a 6-dimensional subspace of 24 dimensions
    white = normalise_rows(rows, "whiten").double()
    assert white.mean(dim=0).abs().max() < 1e-5
    covariance = white.T @ white / rows.shape[0]
    eigenvalues = torch.linalg.eigvalsh(covariance)
    spanned = eigenvalues[eigenvalues > 1e-3]
    assert len(spanned) == torch.linalg.matrix_rank(rows - rows.mean(dim=0))
    assert torch.allclose(spanned, torch.ones_like(spanned), atol=1e-4)
    assert torch.equal(normalise_rows(rows, "none"), rows)
    torch.testing.assert_close(normalise_rows(rows, "centre"), rows - rows.mean(dim=0))


def test_a_default_model_keeps_the_checkpoint_layout_and_catt_drops_the_gate():
    """Old checkpoints load: the default config adds no parameter; CATT's form has no gate to learn."""
    names = set(CMDCL(small_config(), ["a", "b"]).state_dict())
    assert set(KEY_WEIGHTS) <= names and "visual.gate.weight" in names and not any("temperature" in n for n in names)
    catt = set(CMDCL(small_config(approximator="catt", learn_temperature=True), ["a", "b"]).state_dict())
    assert "visual.gate.weight" not in catt and {"textual.k.log_temperature", "visual.k_conf.log_temperature"} <= catt


@pytest.mark.parametrize("field,value", [("approximator", "attention"), ("key_norm", "pca"), ("learn_temperature", 1),
                                         ("fixed_key_proj", "yes")])
def test_the_config_refuses_unknown_variants(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_cmdcl_train_sets_variants_with_model_options_and_refuses_bad_ones(tmp_path):
    data = generate(tmp_path / "train", 4, seed=0, cfg=SynthConfig(size=32))
    out = tmp_path / "model.pt"
    base = ["--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "2", "--frames", "2", "--image-size", "32",
            "--text-init", "random", "--model-option", "num_bias=4", "--model-option", "num_confounders=4"]
    ok = CliRunner().invoke(train_cli, [*base, "--model-option", "approximator=catt", "--model-option", "learn_temperature=true",
                                        "--model-option", "key_norm=whiten"])
    assert ok.exit_code == 0, ok.output
    cfg = load_checkpoint(out).cfg
    assert (cfg.approximator, cfg.learn_temperature, cfg.key_norm, cfg.fixed_key_proj) == ("catt", True, "whiten", False)
    for option, message in [("approximator", "is not FIELD=VALUE"), ("key_norm=pca", "key_norm must be"),
                            ("colour=red", "unknown CMDCL config fields: colour"), ("visual_intervention=false", "use --ablation")]:
        result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "other.pt"), "--model-option", option])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, (option, result.output)
        assert sum("rror" in line for line in result.output.splitlines()) == 1, result.output  # one error line
