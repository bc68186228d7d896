"""Model files are validated before use (issue 14 item 5): split graphs belong with their model,
every number from a checkpoint, an export's metadata or an engine sidecar is bounded, and a
checkpoint cannot unpack to more than its config implies."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch

from cmdcl.artifacts import read_sidecar
from cmdcl.export import export_onnx
from cmdcl.export.metadata import ModelFileError, check_metadata, read_metadata
from cmdcl.model import CheckpointError, CMDCLConfig, load_checkpoint, save_checkpoint
from cmdcl.model import checkpoint as checkpoint_module
from cmdcl.model.config import sampling_problem
from cmdcl.runtime import BackendError, load_backend
from conftest import small_config


def _model(seed=0, classes=("a", "b", "c"), **overrides):
    torch.manual_seed(seed)
    from cmdcl.model import CMDCL

    return CMDCL(small_config(**overrides), list(classes)).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Model A exported with its split graphs; model B (same config, other weights) without."""
    a = export_onnx(_model(seed=0), tmp_path_factory.mktemp("a") / "m.onnx")
    b = export_onnx(_model(seed=1), tmp_path_factory.mktemp("b") / "m.onnx", split=False)
    return a, b["full"]


def _frames(n=2, size=32):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- split graphs from another export ------------------------------------------------------------------------------
def test_split_graphs_of_the_same_export_are_used(exports):
    a, _ = exports
    backend = load_backend(a["full"])
    tokens = backend.encode_frames(_frames())
    assert backend.classify_tokens(np.stack([tokens[[0, 1, 0, 1]]])).shape == (1, 3)


@pytest.mark.parametrize("part", ["frame_encoder", "head"])
def test_stream_mode_refuses_split_graphs_left_from_another_export(exports, tmp_path, part):
    """What `cmdcl-export --no-split` over an older export leaves: B's model next to A's split graphs."""
    a, b = exports
    model = tmp_path / "m.onnx"
    shutil.copyfile(b, model)
    for role in ("frame_encoder", "head"):
        shutil.copyfile(a[role], tmp_path / f"m.{role}.onnx")
    backend = load_backend(model)
    with pytest.raises(BackendError) as info:
        backend.encode_frames(_frames()) if part == "frame_encoder" else backend.classify_tokens(np.zeros((1, 4, 5, 32), np.float32))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / f'm.{part}.onnx'}: its weights_hash differs from that of {model}")
    assert "\n" not in message


def test_a_split_graph_in_the_wrong_role_is_refused(exports, tmp_path):
    a, _ = exports
    shutil.copyfile(a["full"], tmp_path / "m.onnx")
    shutil.copyfile(a["head"], tmp_path / "m.frame_encoder.onnx")
    with pytest.raises(BackendError, match="is a head graph, not the frame_encoder graph of"):
        load_backend(tmp_path / "m.onnx").encode_frames(_frames())


def test_engine_sidecars_are_validated_and_split_engines_compared(exports, tmp_path):
    """No TensorRT needed: the sidecar checks run before any engine is deserialised."""
    from cmdcl.export.metadata import check_same_export

    a, b = exports

    def sidecar(name, metadata, profile=None):
        profile = profile or {"min": 1, "opt": 4, "max": 8}
        (tmp_path / f"{name}.json").write_text(json.dumps({"metadata": metadata, "batch_profile": profile}, default=str))
        return tmp_path / name

    good = {k: v for k, v in read_metadata(a["full"]).items() if k != "path"}
    plan = sidecar("m.plan", good)
    assert read_sidecar(plan)["metadata"]["classes"] == ["a", "b", "c"]
    stale = sidecar("m.head.plan", {**read_metadata(b), "graph_role": "head"})
    with pytest.raises(ModelFileError, match="m.head.plan: its weights_hash differs from that of .*m.plan"):
        check_same_export(plan, good, stale, read_sidecar(stale)["metadata"], "head")
    hostile = {"num_frames": "4", "multi_label": 1, "sampling": {**good["sampling"], "stream_fps": 0}}
    for key, value in hostile.items():
        with pytest.raises(ModelFileError) as info:
            read_sidecar(sidecar("bad.plan", {**good, key: value}))
        assert str(info.value).startswith(f"{tmp_path / 'bad.plan.json'}: metadata ") and key in str(info.value)
    for profile in ({"min": 1, "opt": 9, "max": 8}, {"min": 0, "opt": 1, "max": 1}, {"min": 1, "opt": 1, "max": "8"}, [1, 8]):
        with pytest.raises(ModelFileError, match="bad.plan.json: batch_profile .* is not integers 1 <= min <= opt <= max"):
            read_sidecar(sidecar("bad.plan", good, profile))
    for text in ("{not json", "[" * 100_000, json.dumps({"metadata": [1]}), json.dumps({}), json.dumps({"metadata": good})):
        (tmp_path / "bad.plan.json").write_text(text)
        with pytest.raises(ModelFileError, match="bad.plan.json: "):
            read_sidecar(tmp_path / "bad.plan")


# ---- bounded config ------------------------------------------------------------------------------------------------
HOSTILE_CONFIGS = {
    "frames 1e9": ({"num_frames": 10**9}, "num_frames 1000000000 is out of range [1, 4096]"),
    "frames as float": ({"num_frames": 1e9}, "num_frames must be an integer"),
    "frames as string": ({"num_frames": "8"}, "num_frames must be an integer"),
    "100000 layers": ({"vision": {"layers": 100_000}}, "vision.layers 100000 is out of range [1, 64]"),
    "patch size 0": ({"vision": {"patch_size": 0}}, "vision.patch_size 0 is out of range [1, 1024]"),
    "negative width": ({"width": -8}, "width -8 is out of range [1, 8192]"),
    "NaN mlp ratio": ({"mlp_ratio": float("nan")}, "mlp_ratio nan is out of range"),
    "inf logit scale": ({"logit_scale_init": float("inf")}, "logit_scale_init inf is out of range"),
    "heads not dividing width": ({"vision": {"heads": 3}}, "vision.width 32 is not divisible by vision.heads 3"),
    "patch grid too fine": ({"vision": {"image_size": 1024, "patch_size": 1}}, "at most 64 patches a side"),
    "clip of 12 GiB": ({"num_frames": 4096, "vision": {"image_size": 1024, "patch_size": 16}}, "one clip takes 12.0 GiB"),
    "bool as int": ({"multi_label": 1}, "multi_label must be a bool"),
    "unknown nested field": ({"vision": {"bogus": 1}}, "unknown CMDCL config fields: vision.bogus"),
    "vision not an object": ({"vision": 7}, "'vision' must be an object"),
    "two-value mean": ({"mean": [0.5, 0.5]}, "mean needs three numbers"),
    "zero std": ({"std": [0, 1, 1]}, "std three in [0.001, 1]"),
    "mean a number": ({"mean": 5}, "mean needs three numbers"),
}


def _edited(config: dict, change: dict) -> dict:
    config = json.loads(json.dumps(config))
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_config_numbers_are_typed_and_bounded(case):
    change, expected = HOSTILE_CONFIGS[case]
    with pytest.raises(ValueError) as info:
        CMDCLConfig.from_dict(_edited(small_config().to_dict(), change))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_config_missing_fields_take_validated_defaults():
    """A checkpoint written before a field existed still loads; the defaults it gets are checked like any value."""
    config = small_config().to_dict()
    del config["pooling"]
    assert CMDCLConfig.from_dict(config).pooling == CMDCLConfig().pooling
    config = small_config().to_dict()
    del config["vision"]["patch_size"]  # the default 16 px patch fits the small config's 32 px frames
    loaded = CMDCLConfig.from_dict(config)
    assert loaded.vision.patch_size == 16
    config = small_config().to_dict()
    config["vision"]["image_size"] = 40
    del config["vision"]["patch_size"]  # 40 px is no multiple of the default 16 px patch
    with pytest.raises(ValueError, match="multiple of vision.patch_size"):
        CMDCLConfig.from_dict(config)


def test_real_model_sizes_stay_within_bounds():
    for vision in ({"image_size": 336, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16, "output_dim": 768},
                   {"image_size": 224, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16, "output_dim": 1280}):
        CMDCLConfig.from_dict(_edited(CMDCLConfig().to_dict(), {"vision": vision, "num_frames": 64}))


def _rewrite(path, out, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, out)
    return out


def _one_line_error(error, load, path, prefix, fragments):
    """The one-line error `load(path)` raises: it starts with `<path>: <prefix>` and holds every fragment."""
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {prefix}") and "\n" not in message and len(message) < 400
    for fragment in fragments:
        assert fragment in message
    return message


def _checkpoint_error(path, *fragments):
    return _one_line_error(CheckpointError, load_checkpoint, path, "", fragments)


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(_model(), tmp_path / "good.pt")


def test_checkpoint_config_is_bounded_before_the_model_is_built(checkpoint, tmp_path):
    deep = _rewrite(checkpoint, tmp_path / "deep.pt", lambda p: p["config"]["vision"].update(layers=65))
    _checkpoint_error(deep, "invalid CMDCL config: vision.layers 65 is out of range [1, 64]")
    nan = _rewrite(checkpoint, tmp_path / "nan.pt", lambda p: p["config"].update(mlp_ratio=float("nan")))
    _checkpoint_error(nan, "mlp_ratio nan is out of range")


def test_checkpoint_nested_too_deeply_is_one_line(checkpoint, tmp_path):
    deep = []
    for _ in range(5000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # torch.save pickles recursively
    try:
        path = _rewrite(checkpoint, tmp_path / "deep.pt", lambda p: p["extra"].update(deep=deep))
    finally:
        sys.setrecursionlimit(limit)
    _checkpoint_error(path, "refused: its data is nested too deeply")


@pytest.mark.parametrize("sampling, expected", [
    ({"stream_fps": 0}, "stream_fps 0 is not a number in [1e-05, 1000]"),
    ({"window_seconds": 1e-9}, "window_seconds 1e-09 is not a number in [0.01, 86400]"),
    ({"window_seconds": float("nan")}, "window_seconds nan"),
    ({"stride_frames": "2"}, "stride_frames '2' is not an integer"),
    ({"num_frames": 10**9}, "num_frames 1000000000 is not the model's 4"),
])
def test_checkpoint_sampling_is_bounded(checkpoint, tmp_path, sampling, expected):
    bad = _rewrite(checkpoint, tmp_path / "bad.pt", lambda p: p["extra"].update(sampling=sampling))
    _checkpoint_error(bad, "checkpoint extra: sampling " + expected)


@pytest.mark.parametrize("classes, expected", [
    (["a", "b", "a"], "class name 'a' appears more than once"),
    (["a", 7, "c"], "class name 7 is not a non-blank string"),
    (["a", "", "c"], "is not a non-blank string"),
    (["a", "x" * 5000, "c"], "at most 1000 characters"),
    ([], "class names must be a non-empty list"),
])
def test_checkpoint_class_names_are_checked(checkpoint, tmp_path, classes, expected):
    _checkpoint_error(_rewrite(checkpoint, tmp_path / "bad.pt", lambda p: p.update(class_names=classes)), expected)


def test_sampling_grid_rate_is_bounded():
    assert sampling_problem({"window_seconds": 0.01}, 64) == "sampling takes 64 frames in 0.01 s, more than 1000 frames per second"
    assert sampling_problem({"window_seconds": 64.0, "stream_fps": 1.0, "stride_frames": 32, "num_frames": 64}, 64) is None


# ---- a checkpoint's size against its config ---------------------------------------------------------------------
def _deflated_bomb(checkpoint, out, size=2**28):
    """The checkpoint with a `size`-byte zero tensor in extra, rewritten with that entry deflated (~size/1000 on disk).
    The pickle comes from a skeleton saved with skip_data (a sparse file), the other tensors from a real save."""
    payload = torch.load(checkpoint, weights_only=True)
    skeleton, real = out.with_name("skeleton.pt"), out.with_name("real.pt")
    payload["extra"]["blob"] = torch.empty(0, dtype=torch.uint8)
    torch.save(payload, real)
    payload["extra"]["blob"] = torch.empty(size, dtype=torch.uint8)  # never written to: no memory
    with torch.serialization.skip_data():
        torch.save(payload, skeleton)
    with zipfile.ZipFile(skeleton) as sk, zipfile.ZipFile(real) as rz, zipfile.ZipFile(out, "w") as bomb:
        real_data = {i.filename.split("/", 1)[1]: i for i in rz.infolist()}
        for info in sk.infolist():
            name = info.filename.split("/", 1)[1]
            if info.file_size == size:
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(deflated, "w", force_zip64=True) as entry:
                    chunk = bytes(2**20)
                    for _ in range(size // len(chunk)):
                        entry.write(chunk)
            elif name == "data.pkl":
                bomb.writestr(info.filename, sk.read(info))
            else:
                bomb.writestr(info.filename, rz.read(real_data[name]))
    skeleton.unlink()
    real.unlink()
    return out


def test_deflated_tensor_is_refused_before_it_is_unpacked(checkpoint, tmp_path):
    """Without the check torch.load inflates the 256 MiB entry (2 GiB in the issue's example)."""
    path = _deflated_bomb(checkpoint, tmp_path / "bomb.pt")
    assert path.stat().st_size < 2**21
    assert max(i.file_size for i in zipfile.ZipFile(path).infolist()) == 2**28
    _checkpoint_error(path, "refused: archive entry", "is compressed")


def test_stored_tensors_far_beyond_the_config_are_refused(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "EXTRA_TENSOR_BYTES", 2**20)
    big = _rewrite(checkpoint, tmp_path / "big.pt", lambda p: p["extra"].update(blob=torch.zeros(2**22)))
    _checkpoint_error(big, "refused: its tensors take 16.2 MiB, far more than the 0.2 MiB of the model its config describes")
    small = _rewrite(checkpoint, tmp_path / "small.pt", lambda p: p["extra"].update(blob=torch.zeros(2**16)))
    assert load_checkpoint(small).checkpoint_extra["blob"].shape == (2**16,)  # within the allowance


def test_config_describing_a_huge_model_is_refused_before_it_is_built(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_MODEL_BYTES", 2**20)
    wide = _rewrite(checkpoint, tmp_path / "wide.pt", lambda p: p["config"]["vision"].update(width=512, heads=8))
    _checkpoint_error(wide, "refused: its config describes a model of", "at most 1.0 MiB")


def test_archive_larger_than_any_model_is_refused(checkpoint, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_MODEL_BYTES", 0)
    monkeypatch.setattr(checkpoint_module, "EXTRA_TENSOR_BYTES", 2**10)
    _checkpoint_error(checkpoint, "refused: its tensors take", "at most 0.0 MiB")


# ---- an export's metadata ----------------------------------------------------------------------------------------
def _tampered(path, out, **values):
    proto = onnx.load(path)
    props = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        props[key].value = value if isinstance(value, str) else json.dumps(value)
    if "config" in values:  # a careful forger keeps the hash in step
        props["config_hash"].value = hashlib.sha256(json.dumps(values["config"], sort_keys=True).encode()).hexdigest()[:16]
    onnx.save(proto, out)
    return out


def _metadata_error(path, *fragments):
    _one_line_error(ModelFileError, read_metadata, path, "metadata ", fragments)


def test_export_metadata_numbers_are_bounded(exports, tmp_path):
    a, _ = exports
    meta = read_metadata(a["full"])
    sampling, config = meta["sampling"], meta["config"]
    cases = [
        ({"sampling": {**sampling, "stream_fps": 0}}, "metadata sampling stream_fps 0 is not a number in [1e-05, 1000]"),
        ({"sampling": {**sampling, "window_seconds": 1e-9}}, "window_seconds 1e-09"),
        ({"sampling": {**sampling, "stride_frames": -1}}, "stride_frames -1"),
        ({"sampling": "NaN"}, "'sampling' must be an object"),
        ({"config": _edited(config, {"num_frames": 10**9}), "num_frames": "1000000000"}, "num_frames 1000000000 is out of range"),
        ({"config": _edited(config, {"vision": {"layers": 100_000}})}, "vision.layers 100000 is out of range [1, 64]"),
        ({"classes": ["a", "b", "a"]}, "class name 'a' appears more than once"),
        ({"classes": [f"c{i}" for i in range(100_001)]}, "100001 class names, at most 100000"),
        ({"config": [1] * 5}, "'config' does not describe a CMDCL model"),
        ({"config": "[" * 100_000}, "'config' is malformed (nested too deeply)"),
        ({"num_frames": "9" * 5000}, "'num_frames' is malformed"),
    ]
    for i, (values, expected) in enumerate(cases):
        _metadata_error(_tampered(a["full"], tmp_path / f"t{i}.onnx", **values), expected)


def test_metadata_of_a_sidecar_is_checked_like_the_file(exports):
    a, _ = exports
    meta = read_metadata(a["full"])
    assert check_metadata("m.plan.json", dict(meta)) == meta
    with pytest.raises(ModelFileError, match="^m.plan.json: metadata is missing: classes$"):
        check_metadata("m.plan.json", {k: v for k, v in meta.items() if k != "classes"})
