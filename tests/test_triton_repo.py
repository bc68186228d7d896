"""The Triton model repository: configs parsed with Triton's ModelConfig schema
(tritonclient's model_config_pb2, in the serving venv), tensors checked against
the exported graphs, writer and validator errors, cmdcl-export --triton-repo."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cmdcl.serve.triton_repo import TritonRepoError, to_pbtxt, write_triton_repo
from serve_helpers import (
    CLASSES,
    export_small_model,
    require_serve_venv,
    run_serve_python,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model"))


def validate(repo):
    """Triton's schema parse plus our checks, in the serving venv: (exit status, summary or error)."""
    require_serve_venv()
    result = run_serve_python("-m", "cmdcl.serve.triton_repo", repo)
    return result.returncode, (json.loads(result.stdout) if result.returncode == 0 else result.stderr.strip())


def test_onnx_repository_configs_parse_and_name_the_right_tensors(exported, tmp_path):
    repo = tmp_path / "repo"
    written = write_triton_repo(exported["full"], repo, max_batch=8, max_frames=64, stride_frames=2)
    assert sorted(p.parent.name for p in written) == ["cmdcl", "cmdcl_stream", "frame_encoder", "head"]
    status, models = validate(repo)
    assert status == 0, models
    encoder, head, clip, stream = (models[n] for n in ("frame_encoder", "head", "cmdcl", "cmdcl_stream"))
    # small_config: 32 px frames, F = 4, S = 5 tokens per frame, D = 32, C = 3
    assert encoder["platform"] == "onnxruntime_onnx" and encoder["backend"] == "onnxruntime"
    assert encoder["inputs"] == {"frames": ["TYPE_UINT8", [32, 32, 3]]}
    assert encoder["outputs"] == {"tokens": ["TYPE_FP32", [5, 32]]}
    assert encoder["max_batch_size"] == 64 and encoder["batching"] == "dynamic"
    assert head["inputs"] == {"tokens": ["TYPE_FP32", [4, 5, 32]]}
    assert head["outputs"] == {"logits": ["TYPE_FP32", [3]], "embedding": ["TYPE_FP32", [32]]}
    assert head["labels"] == {"logits": "labels.txt"} and head["max_batch_size"] == 8
    assert encoder["instance_groups"] == head["instance_groups"] == [["KIND_AUTO", 1]]
    assert clip["backend"] == "python" and clip["batching"] == "dynamic"
    assert clip["inputs"] == {"frames": ["TYPE_UINT8", [4, 32, 32, 3]]} and clip["outputs"] == head["outputs"]
    assert stream["batching"] == "sequence" and stream["control_inputs"] == ["START", "END", "CORRID"]
    assert stream["inputs"] == {"frame": ["TYPE_UINT8", [32, 32, 3]]}
    assert stream["outputs"] == {"logits": ["TYPE_FP32", [3]], "window": ["TYPE_INT32", [1]]}
    assert stream["parameters"]["stride_frames"] == "2" and stream["parameters"]["num_frames"] == "4"
    for name in ("head", "cmdcl", "cmdcl_stream"):
        assert (repo / name / "labels.txt").read_text().splitlines() == CLASSES
    assert (repo / "cmdcl" / "1" / "model.py").read_text().startswith('"""Triton Python-backend model (BLS)')
    assert (repo / "frame_encoder" / "1" / "model.onnx").read_bytes() == exported["frame_encoder"].read_bytes()


def test_validation_rejects_bad_configs(exported, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(exported["full"], repo)
    config = repo / "head" / "config.pbtxt"
    original = config.read_text()
    config.write_text(original.replace('name: "tokens"', 'name: "features"'))  # a tensor the graph does not have
    status, error = validate(repo)
    assert status == 1 and "head/config.pbtxt" in error and "features" in error
    config.write_text(original.replace("max_batch_size", "max_batch"))  # not a ModelConfig field: the parser says so
    status, error = validate(repo)
    assert status == 1 and "not a valid Triton model config" in error and "max_batch" in error
    config.write_text(original.replace("TYPE_FP32", "TYPE_FLOAT32", 1))  # not a DataType enum value
    status, error = validate(repo)
    assert status == 1 and "TYPE_FLOAT32" in error
    config.write_text(original)
    (repo / "head" / "labels.txt").unlink()
    status, error = validate(repo)
    assert status == 1 and "labels.txt" in error


def test_plan_repository_is_written_and_validated_as_configs(exported, tmp_path):
    """No TensorRT here: the engine files are stand-in bytes with the sidecar cmdcl-build
    writes (built from the real metadata), so this checks the configs, not an engine."""
    from cmdcl.export.metadata import read_metadata

    for role in ("frame_encoder", "head"):
        plan = tmp_path / f"model.{role}.plan"
        plan.write_bytes(b"stand-in engine bytes")
        sidecar = {"metadata": {k: v for k, v in read_metadata(exported[role]).items() if k != "path"},
                   "batch_profile": {"min": 1, "opt": 16, "max": 16}}
        (tmp_path / f"model.{role}.plan.json").write_text(json.dumps(sidecar))
    with pytest.raises(TritonRepoError, match="optimisation profile allows batch 16"):
        write_triton_repo(exported["full"], tmp_path / "repo", "plan", tmp_path / "model.plan", max_batch=8, max_frames=64)
    with pytest.raises(TritonRepoError, match="needs the TensorRT engine"):
        write_triton_repo(exported["full"], tmp_path / "repo", "plan")
    write_triton_repo(exported["full"], tmp_path / "repo", "plan", tmp_path / "model.plan", max_batch=8, max_frames=16)
    status, models = validate(tmp_path / "repo")
    assert status == 0, models
    for role in ("frame_encoder", "head"):
        assert models[role]["platform"] == "tensorrt_plan" and models[role]["instance_groups"] == [["KIND_GPU", 1]]
    assert models["frame_encoder"]["max_batch_size"] == 16
    assert (tmp_path / "repo" / "head" / "1" / "model.plan").is_file()


def test_writer_errors(exported, tmp_path):
    lonely = tmp_path / "lonely.onnx"
    shutil.copyfile(exported["full"], lonely)
    with pytest.raises(TritonRepoError, match="lonely.frame_encoder.onnx: no such file"):
        write_triton_repo(lonely, tmp_path / "repo")
    with pytest.raises(TritonRepoError, match="not a CMDCL model file|no such file"):
        write_triton_repo(tmp_path / "absent.onnx", tmp_path / "repo")
    with pytest.raises(TritonRepoError, match="engine format"):
        write_triton_repo(exported["full"], tmp_path / "repo", "savedmodel")


def test_pbtxt_writer():
    text = to_pbtxt({"name": "m", "dims": [1, 2], "flag": True, "group": [{"count": 1}, {"count": 2}], "empty": {}})
    assert text == 'name: "m"\ndims: [1, 2]\nflag: true\ngroup {\n  count: 1\n}\ngroup {\n  count: 2\n}\nempty {\n}'


def test_export_cli_writes_the_repository(exported, tmp_path):
    from cmdcl.cli.export import main

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["--ckpt", str(exported["full"].with_suffix(".pt")), "--out", str(out),
                                       "--no-verify", "--triton-repo", str(tmp_path / "repo"), "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "wrote triton repository" in result.output
    status, models = validate(tmp_path / "repo")
    assert status == 0, models
    assert models["head"]["max_batch_size"] == models["frame_encoder"]["max_batch_size"] == 4
    result = CliRunner().invoke(main, ["--ckpt", str(exported["full"].with_suffix(".pt")), "--out", str(out),
                                       "--no-split", "--triton-repo", str(tmp_path / "repo")])
    assert result.exit_code == 1 and "--triton-repo needs the split graphs" in result.stderr


def test_split_graphs_from_another_export_are_refused(exported, tmp_path):
    """The repository's frame_encoder/head must be the clip model's own halves, or `cmdcl` and `cmdcl_stream` would
    serve another model than the one named."""
    import torch

    from cmdcl.export import export_onnx
    from cmdcl.model import CMDCL
    from conftest import small_config

    torch.manual_seed(1)  # same config and classes, other weights: a retrained model exported without --split
    other = export_onnx(CMDCL(small_config(), CLASSES).eval(), tmp_path / "model.onnx", split=False)["full"]
    for role in ("frame_encoder", "head"):
        shutil.copyfile(exported[role], tmp_path / f"model.{role}.onnx")
    with pytest.raises(TritonRepoError, match="model.frame_encoder.onnx: its weights_hash differs from that of"):
        write_triton_repo(other, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
