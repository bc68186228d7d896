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

# A sampling as cmdcl-train records it: F = 4 frames over 8 s (0.5 grid frames per second), windows every 3 frames (6 s).
RECORDED = {"num_frames": 4, "video": "uniform", "stream_fps": 0.5, "window_seconds": 8.0, "stride_frames": 3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model"))


def export_recorded_model(directory):
    """The small test model with RECORDED in its checkpoint (hence its ONNX metadata); returns export_onnx's paths."""
    import torch

    from cmdcl.export import export_onnx
    from cmdcl.model import CMDCL, save_checkpoint
    from conftest import small_config

    torch.manual_seed(2)
    model = CMDCL(small_config(), CLASSES).eval()
    model.checkpoint_extra = {"sampling": RECORDED}
    save_checkpoint(model, directory / "model.pt", model.checkpoint_extra)
    return export_onnx(model, directory / "model.onnx")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return export_recorded_model(tmp_path_factory.mktemp("recorded"))


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
    assert stream["outputs"] == {"logits": ["TYPE_FP32", [3]], "window": ["TYPE_INT32", [1]], "scale": ["TYPE_FP32", [1]]}
    assert stream["parameters"]["stride_frames"] == "2" and stream["parameters"]["num_frames"] == "4"
    # no sampling recorded: F = 4 frames at 1 frame per second
    assert stream["parameters"]["window_seconds"] == "4.0" and stream["parameters"]["window_frames"] == "4"
    assert stream["parameters"]["grid_fps"] == "1.0"
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


@pytest.mark.parametrize("windows, stride, expected", [
    # the recorded window, 8 s = F = 4 grid frames at 0.5 frame/s; stride 3 frames (6 s) as recorded
    (None, None, {"window_seconds": "8.0", "window_frames": "4", "grid_fps": "0.5", "stride_frames": "3"}),
    # two scales, given unsorted and repeated: 18 s = 9 frames on the 8 s window's grid; the stride stays 6 s = 3 frames
    ((18, 8, 8.0), None, {"window_seconds": "8.0,18.0", "window_frames": "4,9", "grid_fps": "0.5", "stride_frames": "3"}),
    # a shorter first window sets a finer grid (1 frame/s): 18 s = 18 frames, the recorded 6 s stride = 6 frames
    ((4, 18), None, {"window_seconds": "4.0,18.0", "window_frames": "4,18", "grid_fps": "1.0", "stride_frames": "6"}),
    ((4, 6, 10), 1, {"window_seconds": "4.0,6.0,10.0", "window_frames": "4,6,10", "grid_fps": "1.0", "stride_frames": "1"}),
])
def test_stream_model_windows_and_stride_follow_the_recorded_sampling(recorded, tmp_path, windows, stride, expected):
    """The cmdcl_stream config takes stream mode's defaults from the model's metadata (RECORDED) and its scales as
    cmdcl-run --window does; the grid numbers are worked out by hand above, and equal the runtime's own."""
    from cmdcl.runtime import Recognizer, load_backend

    write_triton_repo(recorded["full"], tmp_path / "repo", windows=windows, stride_frames=stride)
    status, models = validate(tmp_path / "repo")
    assert status == 0, models
    stream = models["cmdcl_stream"]
    assert {key: stream["parameters"][key] for key in expected} == expected
    scales = len(expected["window_frames"].split(","))
    logits = [3] if scales == 1 else [scales, 3]  # one scale: today's [C] per request
    assert stream["outputs"] == {"logits": ["TYPE_FP32", logits], "window": ["TYPE_INT32", [scales]],
                                 "scale": ["TYPE_FP32", [scales]]}
    assert "window_frames" not in models["cmdcl"]["parameters"]
    with load_backend(recorded["full"]) as backend:  # stream mode's grid for the same options
        runtime = Recognizer(backend, window=windows, stride=None if stride is None else stride / float(expected["grid_fps"]))
    assert ",".join(map(repr, runtime.scales)) == expected["window_seconds"]
    assert ",".join(map(str, runtime.spans)) == expected["window_frames"]
    assert runtime.stride_frames == int(expected["stride_frames"]) and runtime.grid_rate == float(expected["grid_fps"])


@pytest.mark.parametrize("windows, problem", [
    (list(range(1, 10)), "give 1 to 8 different window lengths, not 9"),
    ((8, float("nan")), "positive number of seconds"),
    ((0, 8), "positive number of seconds"),
    ((8, 8 * 1025), "8200 s at the grid of the 8 s window (4 frames) is 4100 grid frames; at most 4096"),
    (0.001, "window 0.001 s is too short for 4 frames"),
])
def test_stream_windows_the_runtime_refuses_are_refused_in_one_line(recorded, tmp_path, windows, problem):
    with pytest.raises(TritonRepoError, match="stream window") as error:
        write_triton_repo(recorded["full"], tmp_path / "repo", windows=windows)
    assert problem in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "repo").exists()


def test_export_cli_stream_window_sets_the_stream_scales_and_refuses_bad_ones(recorded, tmp_path):
    from cmdcl.cli.export import main

    out, repo = tmp_path / "m.onnx", tmp_path / "repo"
    base = ["--ckpt", str(recorded["full"].with_suffix(".pt")), "--out", str(out), "--no-verify"]
    for value, problem in [("8,x", "expected seconds like 8 or 8,32"), ("8,-1", "-1.0 is not in the range 0<x<=86400"),
                           ("8,8200", "4100 grid frames; at most 4096"), (",".join(map(str, range(1, 10))), "not 9")]:
        result = CliRunner().invoke(main, [*base, "--triton-repo", str(repo), "--stream-window", value])
        assert result.exit_code == 2 and "--stream-window" in result.stderr and problem in result.stderr, result.stderr
        assert not out.exists() and not repo.exists()  # refused before anything is written
    result = CliRunner().invoke(main, [*base, "--stream-window", "8"])
    assert result.exit_code == 2 and "--stream-window needs --triton-repo" in result.stderr
    result = CliRunner().invoke(main, [*base, "--triton-repo", str(repo), "--stream-window", "18,8"])
    assert result.exit_code == 0, result.output
    status, models = validate(repo)
    assert status == 0, models
    parameters = models["cmdcl_stream"]["parameters"]
    assert (parameters["window_seconds"], parameters["window_frames"], parameters["stride_frames"]) == ("8.0,18.0", "4,9", "3")


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
