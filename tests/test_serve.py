"""cmdcl-serve (PyTriton: the real Triton server, CPU only) and cmdcl-client.

One server per module, started from the serving venv on free loopback ports and
stopped by its own process group at the end. Answers are compared with the
offline runtime (ONNX Runtime on the same files) at the fp32 tolerance of docs/design.md section 7.
"""

import importlib.util
import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from cmdcl.artifacts import relative_error
from cmdcl.data.video import write_video
from cmdcl.runtime import Recognizer, load_backend
from cmdcl.serve.server import RequestError, model_functions
from serve_helpers import (
    SERVE_BIN,
    export_small_model,
    free_ports,
    request,
    require_serve_venv,
    running_server,
)

MAX_BATCH = 4


def infer_json(base, model, name, array, datatype=None, shape=None):
    """Triton's KServe v2 JSON protocol: one input, every output."""
    body = {"inputs": [{"name": name, "shape": list(array.shape if shape is None else shape),
                        "datatype": datatype or {"uint8": "UINT8", "float32": "FP32"}[array.dtype.name],
                        "data": array.reshape(-1).tolist()}]}
    status, answer = request(f"{base}/v2/models/{model}/infer", body)
    if status != 200:
        return status, answer
    return status, {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    export_small_model(directory)
    rng = np.random.default_rng(0)
    for i in range(2):  # two 2 s videos with different content
        frames = rng.integers(0, 256, (20, 48, 64, 3), dtype=np.uint8)
        frames[:, 10:30, 5 + 20 * i : 25 + 20 * i] = (220, 40 + 100 * i, 30)
        write_video(directory / f"v{i}.mp4", frames, rate=10)
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    require_serve_venv()
    http, grpc, metrics = free_ports(3)
    base = f"http://127.0.0.1:{http}"
    command = [SERVE_BIN / "cmdcl-serve", "--engine", model_dir / "model.onnx", "--http-port", http, "--grpc-port", grpc,
               "--metrics-port", metrics, "--max-batch", MAX_BATCH]
    ready = [f"{base}/v2/models/{m}/ready" for m in ("cmdcl", "frame_encoder", "head")]
    with running_server(command, model_dir / "serve.log", ready) as process:
        yield {"base": base, "http": http, "grpc": grpc, "process": process}


@pytest.fixture(scope="module")
def offline(model_dir):
    return load_backend(model_dir / "model.onnx")


def test_served_answers_equal_offline_runtime(server, offline):
    frames = np.random.default_rng(1).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    status, served = infer_json(server["base"], "cmdcl", "frames", frames)
    assert status == 200, served
    expected = offline.infer("full", {"frames": frames})
    for name in ("logits", "embedding"):
        assert relative_error(served[name], expected[name]) <= 1e-4, name
    order = np.argsort(-offline.probabilities(expected["logits"]), axis=1, kind="stable")
    assert served["top_labels"].tolist() == np.array(offline.info.classes)[order].tolist()
    np.testing.assert_allclose(served["top_scores"], np.take_along_axis(offline.probabilities(expected["logits"]), order, 1),
                               rtol=1e-5)
    # the streaming split: per-frame encoder, then the head on the tokens
    status, tokens = infer_json(server["base"], "frame_encoder", "frames", frames[0])
    assert status == 200 and relative_error(tokens["tokens"], offline.encode_frames(frames[0])) <= 1e-4
    status, heads = infer_json(server["base"], "head", "tokens", tokens["tokens"][None].astype(np.float32))
    assert status == 200 and relative_error(heads["logits"], expected["logits"][:1]) <= 1e-4


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, offline):
    base, good = server["base"], np.zeros((1, 4, 32, 32, 3), dtype=np.uint8)
    cases = [
        (dict(array=good.astype(np.float32)), "expects 'UINT8'"),  # wrong dtype
        (dict(array=np.zeros((1, 3, 32, 32, 3), np.uint8)), "unexpected shape"),  # too few frames
        (dict(array=np.zeros((1, 5, 32, 32, 3), np.uint8)), "unexpected shape"),  # too many frames
        (dict(array=np.zeros((1, 4, 16, 16, 3), np.uint8)), "unexpected shape"),  # wrong frame size
        (dict(array=np.zeros((0, 4, 32, 32, 3), np.uint8)), "frames"),  # empty batch
        (dict(array=np.zeros((MAX_BATCH + 1, 4, 32, 32, 3), np.uint8)), f"batch-size must be <= {MAX_BATCH}"),
    ]
    for kwargs, message in cases:
        status, answer = infer_json(base, "cmdcl", "frames", **kwargs)
        assert status == 400 and message in answer["error"], (kwargs["array"].shape, answer)
    status, answer = infer_json(base, "cmdcl", "frames", good, shape=[1, 4, 32, 32, 4])  # shape and data disagree
    assert status == 500 and "does not match true shape of 'data'" in answer["error"]  # Triton's JSON parser says 500
    status, answer = request(f"{base}/v2/models/cmdcl/infer", b"{not json")  # refused by the front
    assert status == 400 and answer["error"].startswith("the request is not valid JSON")
    status, answer = infer_json(base, "cmdcl", "images", good)  # an input the model does not have
    assert status == 400 and "images" in answer["error"]
    assert server["process"].poll() is None
    assert request(f"{base}/v2/health/ready")[0] == 200
    status, served = infer_json(base, "cmdcl", "frames", good)
    assert status == 200 and relative_error(served["logits"], offline.classify_clips(good)) <= 1e-4


def test_client_example_over_http_and_grpc(server, model_dir):
    videos = [model_dir / "v0.mp4", model_dir / "v1.mp4"]
    recognizer = Recognizer(model_dir / "model.onnx", top_k=3)
    for protocol, port in (("http", server["http"]), ("grpc", server["grpc"])):
        result = subprocess.run([str(SERVE_BIN / "cmdcl-client"), "classify", *map(str, videos), "--url",
                                 f"127.0.0.1:{port}", "--protocol", protocol], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        for video, line in zip(videos, lines):
            offline = recognizer.predict(video)["top"]
            assert [t["label"] for t in line["top"]] == [t["label"] for t in offline]
            np.testing.assert_allclose([t["score"] for t in line["top"]], [t["score"] for t in offline], atol=2e-6)
    result = subprocess.run([str(SERVE_BIN / "cmdcl-client"), "classify", str(model_dir / "absent.mp4"), "--url",
                             f"127.0.0.1:{server['http']}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "absent.mp4" in result.stderr and "Traceback" not in result.stderr


def test_load_test_reports_latency_and_every_answer_matches(server, model_dir):
    result = subprocess.run([str(SERVE_BIN / "cmdcl-client"), "load-test", str(model_dir / "v0.mp4"), str(model_dir / "v1.mp4"),
                             "--engine", str(model_dir / "model.onnx"), "--url", f"127.0.0.1:{server['grpc']}",
                             "--protocol", "grpc", "--clients", "4", "--seconds", "3", "--max-requests", "300"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] > 0 and report["errors"] == 0 and report["mismatches"] == 0, report
    assert report["requests"] <= 300 and report["seconds"] < 30
    assert 0 < report["p50_ms"] <= report["p99_ms"] and report["throughput_rps"] > 0
    status, config = request(f"{server['base']}/v2/models/cmdcl/config")  # batching across requests is Triton's
    assert status == 200 and config["max_batch_size"] == MAX_BATCH and "dynamic_batching" in config


def test_serves_on_loopback_only(server):
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1, v4-mapped
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                listening.setdefault(int(port, 16), set()).add(address)
    for port in (server["http"], server["grpc"]):
        assert listening.get(port) and listening[port] <= loopback, (port, listening.get(port))


def test_model_functions_check_every_request_and_split_the_batch(offline):
    """Behind Triton's checks (and the front's), the model functions check each request
    again, before the batch is formed."""
    functions = model_functions(offline, top_k=2, max_batch=MAX_BATCH)
    good = SimpleNamespace(data={"frames": np.random.default_rng(2).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)})
    for frames in (np.zeros((4, 32, 32, 3), np.uint8),  # Triton passes a batch dimension of 0 (or 2^32) without the axis
                   np.zeros((0, 4, 32, 32, 3), np.uint8), np.zeros((MAX_BATCH + 1, 4, 32, 32, 3), np.uint8),
                   np.zeros((1, 4, 32, 32, 3), np.float32)):
        bad = SimpleNamespace(data={"frames": frames})
        with pytest.raises(RequestError, match=r"input 'frames' must be uint8 \[B, 4, 32, 32, 3\] with 1 <= B <= 4, got "):
            functions["cmdcl"]([good, bad])
    tokens = np.zeros((1, 4, *offline.encode_frames(np.zeros((1, 32, 32, 3), np.uint8)).shape[1:]), np.float32)
    tokens[0, 1, 2, 3] = np.nan  # would come back as NaN logits, which Triton writes into its JSON answer
    with pytest.raises(RequestError, match="input 'tokens' has NaN or infinite values"):
        functions["head"]([SimpleNamespace(data={"tokens": tokens})])
    one = SimpleNamespace(data={"frames": good.data["frames"][:1]})
    answers = functions["cmdcl"]([one, good])  # the batch is split back per request
    assert [a["top_labels"].shape for a in answers] == [(1, 2), (2, 2)] and answers[0]["top_scores"].dtype == np.float32
    np.testing.assert_allclose(answers[1]["logits"], offline.classify_clips(good.data["frames"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers[0]["logits"], answers[1]["logits"][:1], rtol=1e-5, atol=1e-6)


def test_serve_cli_errors(tmp_path):
    from cmdcl.cli.serve import main

    if importlib.util.find_spec("pytriton") is None:  # the main venv: says where PyTriton lives
        result = CliRunner().invoke(main, ["--engine", str(tmp_path / "m.onnx")])
        assert result.exit_code == 1 and "make serve-venv" in result.stderr
    require_serve_venv()
    http, grpc = free_ports(2)
    result = subprocess.run([str(SERVE_BIN / "cmdcl-serve"), "--engine", str(tmp_path / "absent.onnx"), "--http-port", str(http),
                             "--grpc-port", str(grpc)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == f"cmdcl-serve: error: {tmp_path / 'absent.onnx'}: no such file"


def test_client_errors_are_one_line(model_dir):
    require_serve_venv()
    (port,) = free_ports(1)  # nothing listens there
    for args in (["classify", str(model_dir / "v0.mp4")],
                 ["load-test", str(model_dir / "v0.mp4"), "--engine", str(model_dir / "model.onnx"), "--seconds", "1"],
                 ["load-test", str(model_dir / "absent.mp4"), "--engine", str(model_dir / "model.onnx")]):
        result = subprocess.run([str(SERVE_BIN / "cmdcl-client"), *args, "--url", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("cmdcl-client: error: "), result.stderr
        assert ("absent.mp4" if "absent.mp4" in args[1] else f"127.0.0.1:{port}") in lines[0]


def test_serving_modules_import_without_pytriton_or_tritonclient():
    import sys

    code = ("import json, sys, cmdcl.serve.server, cmdcl.serve.client, cmdcl.serve.triton_repo, cmdcl.cli.serve;"
            "print(json.dumps([m for m in ('pytriton', 'tritonclient') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []
