"""Training that goes non-finite is refused (issue 21, part 4): cmdcl-train and cmdcl-mini-vlm stop with one line
(exit status 1), save no model whose loss or weights are NaN or infinite, and leave the previous outputs as they were;
no JSON report the project writes holds NaN or Infinity."""

import json

import pytest
import torch
from click.testing import CliRunner

from cmdcl.data.synth import SynthConfig, generate
from cmdcl.model import CMDCL, load_checkpoint
from cmdcl.output_files import write_json
from cmdcl.train import mini_vlm
from cmdcl.train.loop import TrainingDiverged, check_finite

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def nan_from_call(n: int, function):
    """`function`, returning NaN from its n-th call on (what too high a learning rate ends in, made deterministic)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        value = function(*args, **kwargs)
        return value * float("nan") if len(calls) >= n else value

    return wrapped


def error_lines(result) -> list[str]:
    """The lines of a run's output (stdout and stderr; progress bars aside) that are not progress: its one error line."""
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]
    return [line for line in lines if "%|" not in line]


@pytest.fixture(scope="module")
def four_videos(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), 4, seed=0, split="train", cfg=SynthConfig(size=32))


@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_cmdcl_train_refuses_to_save_a_model_that_diverged(four_videos, tmp_path, monkeypatch, bad_epoch):
    from cmdcl.cli.train import main

    out = tmp_path / "model.pt"
    out.write_bytes(b"an older checkpoint")
    monkeypatch.setattr(CMDCL, "loss", nan_from_call(bad_epoch, CMDCL.loss))  # one step per epoch: 4 videos, batch 4
    result = CliRunner().invoke(main, ["--data", str(four_videos), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                                       "--frames", "4", "--image-size", "32", "--text-init", "random"])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"cmdcl-train: error: training diverged in epoch {bad_epoch}: the loss is nan (try a lower --lr); "
                                   f"{out} and its .resume file keep the last epoch before it, if any"]
    resume = tmp_path / "model.pt.resume"
    if bad_epoch == 1:  # nothing of this run was finite: the older file stays, no resume state
        assert out.read_bytes() == b"an older checkpoint" and not resume.exists()
    else:  # epoch 1 was finite: the checkpoint and the resume state hold it
        model = load_checkpoint(out)
        assert [h["epoch"] for h in model.checkpoint_extra["history"]] == [1]
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
        assert torch.load(resume, weights_only=True)["epoch"] == 1


def test_cmdcl_mini_vlm_refuses_to_save_a_model_that_diverged(tmp_path, monkeypatch):
    from cmdcl.cli.mini_vlm import main

    out, report = tmp_path / "mini.pt", tmp_path / "report.json"
    out.write_bytes(b"older weights")
    report.write_text('{"older": "report"}')
    # the frozen MiniLM caption embeddings (an optional package) do not matter here
    monkeypatch.setattr(mini_vlm, "minilm_embeddings", lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 384), dim=-1))
    monkeypatch.setattr(mini_vlm, "clip_loss", nan_from_call(2, mini_vlm.clip_loss))
    result = CliRunner().invoke(main, ["--out", str(out), "--json", str(report), "--pairs", "64", "--heldout", "8", "--epochs", "2",
                                       "--batch-size", "32"])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == ["cmdcl-mini-vlm: error: training diverged in epoch 1: the loss is nan (try a lower --lr); "
                                   "nothing written"]
    assert out.read_bytes() == b"older weights" and report.read_text() == '{"older": "report"}'


def test_non_finite_weights_are_refused_even_with_a_finite_loss():
    layer = torch.nn.Linear(2, 2)
    check_finite(0.5, layer, "in epoch 1", "kept")
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 3: weight bias is not finite \(try a lower --lr\); kept$"):
        check_finite(0.5, layer, "in epoch 3", "kept")


def test_json_reports_never_hold_nan_or_infinity(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"p50_ms": float("inf"), "records": [{"loss": float("-inf"), "mAP": float("nan")}], "top1": 0.5})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == {
        "p50_ms": None, "records": [{"loss": None, "mAP": None}], "top1": 0.5}
