"""Checkpoint I/O: round trip, and one clear error type for every bad file."""

import os
import pickle
import zipfile

import pytest
import torch

from cmdcl.model import CheckpointError, load_checkpoint, save_checkpoint
from cmdcl.model.checkpoint import FORMAT_VERSION, read_checkpoint
from conftest import random_frames


def test_round_trip_restores_outputs_config_classes_and_dictionaries(make_model, tmp_path):
    model = make_model(num_classes=4, pooling="attention", multi_label=True)
    prior = torch.softmax(torch.randn(6), 0)
    model.set_dictionaries(torch.randn(5, 24), torch.softmax(torch.randn(5), 0), torch.randn(6, 24), prior)
    path = save_checkpoint(model, tmp_path / "model.pt", extra={"epochs": 3})
    loaded = load_checkpoint(path)
    frames = random_frames(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames)[0], model(frames)[0])
    assert loaded.cfg == model.cfg and loaded.class_names == model.class_names
    torch.testing.assert_close(loaded.conf_prior, prior)
    assert loaded.checkpoint_extra == {"epochs": 3}
    assert not loaded.training
    raw = read_checkpoint(path)
    assert raw["format"] == "cmdcl-checkpoint" and raw["format_version"] == FORMAT_VERSION
    assert raw["preprocessing"]["image_size"] == 32
    assert not any(k in raw["state_dict"] for k in raw["dictionaries"])  # stored once


def test_save_is_atomic(make_model, tmp_path):
    path = save_checkpoint(make_model(), tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert path.stat().st_size > 0


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.pt", "no such file")


def test_directory_and_garbage_and_truncated(make_model, tmp_path):
    expect_error(tmp_path, "not a file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    expect_error(garbage, "not a readable torch checkpoint")
    good = save_checkpoint(make_model(), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect_error(truncated, "not a readable torch checkpoint")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "cmdcl-checkpoint", "payload": _RunsCode()}, path)
    expect_error(path, "refused to load")
    assert not (tmp_path / "pwned").exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_RunsCode()))
    expect_error(plain)
    assert not (tmp_path / "pwned").exists()


def test_other_torch_files_are_not_cmdcl_checkpoints(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    expect_error(tmp_path / "other.pt", "not a CMDCL checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    expect_error(tmp_path / "tensor.pt", "not a CMDCL checkpoint")


def _rewrite(path, out, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, out)
    return out


def test_wrong_version_missing_keys_and_mismatched_weights(make_model, tmp_path):
    good = save_checkpoint(make_model(), tmp_path / "good.pt")
    expect_error(_rewrite(good, tmp_path / "v9.pt", lambda p: p.update(format_version=9)), "format version 9")
    expect_error(_rewrite(good, tmp_path / "nokeys.pt", lambda p: p.pop("class_names")), "missing keys: class_names")
    expect_error(_rewrite(good, tmp_path / "nodict.pt", lambda p: p["dictionaries"].pop("conf_dict")), "conf_dict")
    expect_error(
        _rewrite(good, tmp_path / "mismatch.pt", lambda p: p["state_dict"].pop("logit_bias")),
        "does not match the CMDCL model",
    )
    expect_error(
        _rewrite(good, tmp_path / "badcfg.pt", lambda p: p["config"].update(width=33)),
        "invalid CMDCL config: width 33 is not divisible by heads 4",
    )


def test_legacy_pickle_format_is_refused(tmp_path):
    """torch's pre-zip format gives no sizes to check before loading; save_checkpoint never writes it."""
    path = tmp_path / "legacy.pt"
    torch.save({"format": "cmdcl-checkpoint"}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    expect_error(path, "not a readable torch checkpoint (not a zip archive")
