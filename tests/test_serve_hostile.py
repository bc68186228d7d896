"""cmdcl-serve against a hostile client: it says when it is ready and when it is down,
keeps its own paths out of answers, and refuses a busy port at once.

One server per module (metrics on, `--restart 1`), started from the serving venv on
free loopback ports. The last test crashes it on purpose (Triton 2.51's JSON parser
recurses without a bound) and checks the restart, then the one-line exit.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from serve_helpers import (
    ROOT,
    SERVE_BIN,
    export_small_model,
    free_ports,
    request,
    require_serve_venv,
    run_serve_python,
    running_server,
)

MODELS = ("cmdcl", "frame_encoder", "head")
NESTED = 200_000  # overflows tritonserver's stack (about 400 KB of JSON; 40,000 deep already does)


def post_binary(base, model, name, shape, data: bytes):
    """Triton's binary tensor extension: a JSON header naming `shape`, then the raw bytes."""
    header = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    url, headers = f"{base}/v2/models/{model}/infer", {"Inference-Header-Content-Length": str(len(header))}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=header + data, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def nested_request(base):
    """A request whose data is JSON arrays nested NESTED deep; the connection dies with tritonserver."""
    body = b'{"inputs":[{"name":"frames","shape":[1],"datatype":"UINT8","data":' + b"[" * NESTED + b"]" * NESTED + b"}]}"
    try:
        return request(f"{base}/v2/models/cmdcl/infer", body, timeout=30)
    except OSError as error:  # RemoteDisconnected, ConnectionReset
        return type(error).__name__


def answers(url) -> bool:
    try:
        return request(url, timeout=2)[0] == 200
    except OSError:  # refused while tritonserver restarts
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_serve_venv()
    directory = tmp_path_factory.mktemp("hostile")
    export_small_model(directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    http, grpc, metrics = free_ports(3)
    base = f"http://127.0.0.1:{http}"
    command = [SERVE_BIN / "cmdcl-serve", "--engine", model_dir / "model.onnx", "--http-port", http, "--grpc-port", grpc,
               "--metrics-port", metrics, "--max-batch", 4, "--restart", 1]
    log = model_dir / "serve.log"
    with running_server(command, log, [f"{base}/v2/health/ready"]) as process:
        # at the first 200 from the server's readiness, every model must already answer
        models_at_ready = {m: request(f"{base}/v2/models/{m}/ready", timeout=5)[0] for m in MODELS}
        yield {"base": base, "grpc": grpc, "metrics": metrics, "process": process, "log": log, "models_at_ready": models_at_ready}


def test_readiness_waits_for_the_models(server):
    assert server["models_at_ready"] == {m: 200 for m in MODELS}


def test_batch_of_2_32_gets_a_one_line_error_without_our_paths(server):
    """Triton reads the batch dimension as 32 bits: [2^32, F, H, W, 3] with one clip of data
    reaches the model function as a rank-4 array. It is refused with our message, and the
    answer carries no path of this package or its venv (PyTriton's traceback is cut)."""
    clip = bytes(4 * 32 * 32 * 3)
    status, answer = post_binary(server["base"], "cmdcl", "frames", [2**32, 4, 32, 32, 3], clip)
    assert status >= 400
    error = answer["error"]
    assert "input 'frames' must be uint8 [B, 4, 32, 32, 3] with 1 <= B <= 4, got uint8 [4, 32, 32, 3]" in error, error
    assert str(ROOT) not in error and "site-packages" not in error and "cmdcl/serve" not in error, error
    status, answer = post_binary(server["base"], "cmdcl", "frames", [1, 4, 32, 32, 3], clip)  # still serving
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 3]


def test_metrics_are_served_on_loopback(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "nv_inference_request_success" in text and 'model="cmdcl"' in text
    listening = [line.split()[1] for table in ("/proc/net/tcp", "/proc/net/tcp6") for line in open(table).read().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == server["metrics"]]
    assert listening and all(address.split(":")[0] in ("0100007F", "00000000000000000000000001000000") for address in listening)


def test_grpc_only_and_metrics_configuration():
    """--no-http leaves out the endpoint a nested JSON request crashes; metrics bind to loopback unless
    told; Triton's gRPC allocation pool is off (see the next test)."""
    require_serve_venv()
    code = ("from cmdcl.serve.server import ServeConfig, triton_config;"
            "c = triton_config(ServeConfig(http_port=None, grpc_port=9001, metrics_port=9002));"
            "print(c.allow_http, c.allow_metrics, c.metrics_address, c.metrics_port, c.grpc_infer_allocation_pool_size);"
            "print(sorted(ServeConfig(http_port=None, metrics_port=9002).ports()))")
    result = run_serve_python("-c", code, timeout=60)
    assert result.stdout.splitlines() == ["False True 127.0.0.1 9002 0", "['--grpc-port', '--metrics-port']"], result.stderr


GRPC_FLOOD = """
import sys, tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException
client = grpc.InferenceServerClient(sys.argv[1])
body = bytes(int(sys.argv[2]) * 2**20)
for _ in range(int(sys.argv[3])):
    frames = grpc.InferInput("frames", [1, 4, 32, 32, 3], "UINT8")
    frames._raw_content = body  # far more bytes than the shape says: Triton rejects the request
    try:
        client.infer("cmdcl", [frames])
        sys.exit("accepted")
    except InferenceServerException as error:
        assert "byte size mismatch" in str(error), error
"""


def test_rejected_grpc_requests_do_not_stay_in_memory(server):
    """With Triton's default allocation pool, each rejected 40 MB request stayed allocated
    (8 of them: about +300 MB); without the pool, memory is reused (measured: under +100 MB)."""
    triton_pid = int(next(p for p in _group_commands(server["process"].pid) if p[1][0].endswith(b"/tritonserver"))[0])
    before = _rss_mb(triton_pid)
    result = run_serve_python("-c", GRPC_FLOOD, f"127.0.0.1:{server['grpc']}", 40, 8, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    after = _rss_mb(triton_pid)
    assert after - before < 150, (before, after)


def _rss_mb(pid) -> int:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def _group_commands(pgid):
    """(pid, argv) of every process in the process group."""
    commands = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                commands.append((pid, open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")))
        except OSError:  # gone meanwhile
            continue
    return commands


def test_busy_port_is_one_line_at_once(model_dir):
    http, grpc = free_ports(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", grpc))
        holder.listen()
        started = time.monotonic()
        result = subprocess.run([str(SERVE_BIN / "cmdcl-serve"), "--engine", str(model_dir / "model.onnx"), "--http-port", str(http),
                                 "--grpc-port", str(grpc)], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and result.stderr.strip() == \
        f"cmdcl-serve: error: 127.0.0.1:{grpc} (--grpc-port) is in use by another process", result.stderr


def test_a_crashed_server_restarts_then_exits_1_with_one_line(server):
    """Runs last: it ends the module's server."""
    base, process, log = server["base"], server["process"], server["log"]
    assert nested_request(base) != 200
    deadline = time.monotonic() + 120
    while "restarting it (1 of 1)" not in log.read_text() or not answers(f"{base}/v2/models/cmdcl/ready"):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    status, answer = post_binary(base, "cmdcl", "frames", [1, 4, 32, 32, 3], bytes(4 * 32 * 32 * 3))
    assert status == 200, answer
    nested_request(base)
    assert process.wait(timeout=60) == 1
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("cmdcl-serve: error:")]
    assert len(errors) == 1 and "SIGSEGV" in errors[0] and "after 1 restart(s)" in errors[0], text[-3000:]
