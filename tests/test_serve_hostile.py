"""cmdcl-serve against a hostile client: requests that crash or fool the bundled
Triton 2.51 are refused before it sees them, it says when it is ready and when it is
down (restarting), keeps its own paths out of answers, and refuses a busy port at once.

One server per module (metrics on, `--restart 1`), started from the serving venv on
free loopback ports. The last tests crash tritonserver on purpose (SIGSEGV, as a
crash looks) and check the one supervised restart, then the one-line exit of a crash loop.
"""

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
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
NESTED = 200_000  # overflowed tritonserver's stack (about 400 KB of JSON; 40,000 deep already did)
CLIP = bytes(4 * 32 * 32 * 3)  # one clip of the test model


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


def post_raw(base, body: bytes, headers=()):
    """(status, parsed answer) of a POST written by hand (with a Content-Length unless
    `headers` say chunked); the connection's error name when it dies."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = list(headers)
    if "Transfer-Encoding" not in dict(headers):
        headers.append(("Content-Length", str(len(body))))
    try:
        connection.putrequest("POST", "/v2/models/cmdcl/infer")
        for key, value in headers:
            connection.putheader(key, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    except OSError as error:  # RemoteDisconnected, ConnectionReset: tritonserver died
        return type(error).__name__, None
    finally:
        connection.close()


def json_infer(shape, data=(0,), **fields) -> bytes:
    return json.dumps({"inputs": [{"name": "frames", "shape": shape, "datatype": "UINT8", "data": list(data), **fields}]}).encode()


def served(base) -> bool:
    status, answer = post_binary(base, "cmdcl", "frames", [1, 4, 32, 32, 3], CLIP)
    return status == 200 and answer["outputs"][0]["shape"] == [1, 3]


def answers(url) -> int | None:
    """The HTTP status of a GET, None when the connection fails."""
    try:
        return request(url, timeout=5)[0]
    except OSError:
        return None


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


HOSTILE_HTTP = [  # (what, body, headers, status, in the error): Triton 2.51 crashed, was fooled or took them in
    ("JSON batch of 2^32 (103 bytes: std::bad_alloc, SIGABRT)", json_infer([2**32, 4, 32, 32, 3]), [], 400,
     "shape [4294967296, 4, 32, 32, 3] must be a list of integers from 0 to 2147483647"),
    ("JSON shape Triton would allocate (1.2 TB)", json_infer([1, 4, 32, 32, 10**8]), [], 400, "over the limit of"),
    ("JSON nested 200,000 deep (stack overflow, SIGSEGV)",
     b'{"inputs":[{"name":"frames","shape":[1],"datatype":"UINT8","data":' + b"[" * NESTED + b"]" * NESTED + b"}]}", [], 400,
     "nested too deeply"),
    ("duplicate keys (RapidJSON reads the first)",
     json_infer([1, 4, 32, 32, 3]).replace(b'"shape"', b'"shape":[4294967297],"shape"'), [], 400, "duplicate key"),
    ("chunked body (the front could not bound and check it)", b"5\r\nhello\r\n0\r\n\r\n",
     [("Transfer-Encoding", "chunked")], 411, "Content-Length"),
    ("gzip body (expanded in full by Triton)", gzip.compress(json_infer([1, 4, 32, 32, 3], bytes(12288))),
     [("Content-Encoding", "gzip")], 415, "compressed"),
]


@pytest.mark.parametrize("what, body, headers, status, error", HOSTILE_HTTP, ids=[case[0] for case in HOSTILE_HTTP])
def test_hostile_http_requests_are_refused_and_the_server_keeps_serving(server, what, body, headers, status, error):
    answer = post_raw(server["base"], body, headers)
    assert answer[0] == status and error in answer[1]["error"], (what, answer)
    assert served(server["base"]) and restarts(server) == 0, server["log"].read_text()[-3000:]


def test_front_checks_shapes_and_json_as_triton_reads_them():
    """What the front refuses, without a server: dims Triton would truncate or that are not
    JSON integers (True is 1 to Python, not to RapidJSON), declared bytes over the limit,
    header lengths that do not fit the body. Valid requests and Triton's own cases pass."""
    from cmdcl.serve.front import body_refusal, shape_refusal

    limit = 4 * 12288
    for shape in ([1, 4, 32, 32, 3], [0, 4, 32, 32, 3], [5, 4, 32, 32, 3], [1, 4, 32, 32, 4]):  # Triton's to refuse or not
        assert shape_refusal([("frames", "UINT8", shape)], 10 * limit) is None, shape
    for shape in ([True, 4, 32, 32, 3], [1.0, 4, 32, 32, 3], [2**31, 1], [-1, 4], "[1]", None):
        assert "must be a list of integers from 0 to 2147483647" in shape_refusal([("frames", "UINT8", shape)], limit)
    assert "declares 49156 bytes, over the limit of 49152" in shape_refusal([("tokens", "FP32", [1, 12289])], limit)
    body = json_infer([1, 4, 32, 32, 3])
    assert body_refusal(body, None, limit) is None and body_refusal(body, str(len(body)), limit) is None
    for length in ("-1", "1e3", str(len(body) + 1), "99999999999999999999"):
        assert "is not a length within the body" in body_refusal(body, length, limit)
    assert "nested too deeply" in body_refusal(b"[" * 5000 + b"]" * 5000, None, limit)


def test_the_bodies_the_front_holds_at_once_are_bounded(monkeypatch):
    """A body is read only once its Content-Length fits the front's byte budget; a request that finds no room within
    BODY_WAIT_S gets a 503, so 512 clients each sending the largest body cannot exhaust memory."""
    from cmdcl.serve import front

    monkeypatch.setattr(front, "BODY_WAIT_S", 0.2)
    budget = front._ByteBudget(100)
    assert budget.take(60) and not budget.take(60)
    threading.Timer(0.05, budget.give, [60]).start()  # a body forwarded meanwhile makes room
    assert budget.take(60) and budget.take(40) and not budget.take(1)


def test_batch_of_2_32_and_more_gets_a_one_line_error_without_our_paths(server):
    """Triton 2.51 reads the batch dimension as 32 bits: [2^32 + 1, F, H, W, 3] with one clip of
    data was answered as a batch of 1, over HTTP and gRPC alike. Refused, without a path of this
    package or its venv in the answer."""
    for batch in (2**32 + 1, 2**33 + 1, -(2**32) + 1, 2**32):
        status, answer = post_binary(server["base"], "cmdcl", "frames", [batch, 4, 32, 32, 3], CLIP)
        assert status == 400, (batch, answer)
        error = answer["error"]
        assert f"shape [{batch}, 4, 32, 32, 3] must be a list of integers" in error, error
        assert str(ROOT) not in error and "site-packages" not in error and "cmdcl/serve" not in error, error
    result = run_serve_python("-c", GRPC_BATCHES, f"127.0.0.1:{server['grpc']}", 1, 2**32, 2**32 + 1, 2**33 + 1, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert answers.pop("1") == "logits [1, 3]", answers
    assert all(a.startswith("INVALID_ARGUMENT input 'frames': shape [") for a in answers.values()), answers
    result = run_serve_python("-c", GRPC_STREAM, f"127.0.0.1:{server['grpc']}", 1, 2**32 + 1, timeout=60)
    assert result.stdout.splitlines() == ["logits [1, 3]", "INVALID_ARGUMENT input 'frames': shape [4294967297, 4, 32, 32, 3] "
                                          "must be a list of integers from 0 to 2147483647"], result.stdout + result.stderr[-2000:]
    assert served(server["base"]) and restarts(server) == 0


GRPC_BATCHES = """
import sys, tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException
client = grpc.InferenceServerClient(sys.argv[1])
for batch in sys.argv[2:]:
    frames = grpc.InferInput("frames", [int(batch), 4, 32, 32, 3], "UINT8")
    frames._raw_content = bytes(4 * 32 * 32 * 3)  # one clip
    try:
        print(batch, "logits", list(client.infer("cmdcl", [frames], client_timeout=60).as_numpy("logits").shape))
    except InferenceServerException as error:
        print(batch, error.status().removeprefix("StatusCode."), error.message())
"""


GRPC_STREAM = """
import sys, queue, tritonclient.grpc as grpc
client, results = grpc.InferenceServerClient(sys.argv[1]), queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=60)
for batch in sys.argv[2:]:
    frames = grpc.InferInput("frames", [int(batch), 4, 32, 32, 3], "UINT8")
    frames._raw_content = bytes(4 * 32 * 32 * 3)
    client.async_stream_infer("cmdcl", [frames])
client.stop_stream()
while not results.empty():
    result, error = results.get()
    print(f"logits {list(result.as_numpy('logits').shape)}" if error is None else
          f"{error.status().removeprefix('StatusCode.')} {error.message()}")
"""


@pytest.mark.parametrize("drip", [b"POST /v2/models/cmdcl/infer HTTP/1.1\r\nX-Slow: ",  # headers never finished
                                   b"POST /v2/models/cmdcl/infer HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{"],  # nor the body
                         ids=["headers", "body"])
def test_slow_clients_holding_every_connection_do_not_lock_others_out(server, drip):
    """Slowloris: more connections than the front serves at once (512), each started and then left silent. Every new
    client evicts the one that waited longest for its client, so good requests are answered all along."""
    sockets = []
    try:
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", int(server["base"].rsplit(":", 1)[1])), timeout=10)
            sock.sendall(drip)
            sockets.append(sock)
        for _ in range(3):
            assert answers(f"{server['base']}/v2/health/ready") == 200 and served(server["base"])
    finally:
        for sock in sockets:
            sock.close()
    assert restarts(server) == 0


GRPC_IDLE_STREAMS = """
import sys, grpc, tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
channel = grpc.insecure_channel(sys.argv[1])
stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                               request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
never = __import__("threading").Event()
idle = [stream(iter(never.wait, True), timeout=120) for _ in range(int(sys.argv[2]))]  # streams that never send a message
client = tc.InferenceServerClient(sys.argv[1])
for _ in range(3):
    frames = tc.InferInput("frames", [1, 4, 32, 32, 3], "UINT8")
    frames._raw_content = bytes(4 * 32 * 32 * 3)
    print("unary", list(client.infer("cmdcl", [frames], client_timeout=30).as_numpy("logits").shape), flush=True)
results = __import__("queue").Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=30)
client.async_stream_infer("cmdcl", [frames])
result, error = results.get(timeout=30)
print("stream", error or list(result.as_numpy("logits").shape), flush=True)
client.stop_stream()
cancelled = 0
for call in idle:
    cancelled += call.code() is grpc.StatusCode.CANCELLED if call.done() else 0
    call.cancel()
print("evicted", cancelled > 0)
"""


def test_idle_grpc_streams_do_not_lock_other_calls_out(server):
    """More idle ModelStreamInfer streams than the front runs at once (16 streams, 64 unary calls): unary calls keep
    their threads, and a new stream evicts the one idle longest."""
    result = run_serve_python("-c", GRPC_IDLE_STREAMS, f"127.0.0.1:{server['grpc']}", 90, timeout=120)
    assert result.stdout.splitlines() == ["unary [1, 3]"] * 3 + ["stream [1, 3]", "evicted True"], result.stdout + result.stderr[-2000:]
    assert served(server["base"]) and restarts(server) == 0


def restarts(server) -> int:
    """cmdcl_serve_restarts_total on the metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith("cmdcl_serve_restarts_total ")))


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
    except InferenceServerException as error:  # the front's message limit, or Triton's size check
        assert "byte size mismatch" in str(error) or "RESOURCE_EXHAUSTED" in str(error.status()), error
"""


def test_rejected_grpc_requests_do_not_stay_in_memory(server):
    """With Triton's default allocation pool, each rejected 40 MB request stayed allocated
    (8 of them: about +300 MB); without the pool, memory is reused (measured: under +100 MB).
    The front refuses such messages now; neither it nor tritonserver may keep them."""
    pids = [int(pid) for pid, argv in _group_commands(server["process"].pid)
            if argv[0].endswith(b"/tritonserver") or int(pid) == server["process"].pid]
    before = sum(map(_rss_mb, pids))
    result = run_serve_python("-c", GRPC_FLOOD, f"127.0.0.1:{server['grpc']}", 40, 8, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    after = sum(map(_rss_mb, pids))
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


def test_a_crash_costs_one_supervised_restart_and_readiness_says_so(server):
    """tritonserver dying (as a request that crashes it would make it) is one stderr line, one
    count on the metrics port, 503 from /v2/health/ready (and UNAVAILABLE over gRPC) until the
    models are loaded again, then answers again. Runs after the refusals: it restarts the server."""
    base, log = server["base"], server["log"]
    grpc_client = subprocess.Popen([str(SERVE_BIN / "python"), "-c", GRPC_READY, f"127.0.0.1:{server['grpc']}"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # started before the crash
    try:
        crash_tritonserver(server)  # the restart starts 0.5 s after the supervisor sees it, and takes seconds
        assert request(f"{base}/v2/health/ready", timeout=10)[0] == 503  # down: a refusal at once, not a hang
        grpc_client.stdin.close()  # its cue to ask
        assert grpc_client.stdout.read().strip() == "UNAVAILABLE"
    finally:
        grpc_client.kill()
        grpc_client.wait(timeout=30)
    deadline = time.monotonic() + 120
    while (status := answers(f"{base}/v2/health/ready")) != 200:
        assert status in (503, None) and time.monotonic() < deadline, (status, log.read_text()[-3000:])
        time.sleep(0.2)
    assert served(base) and restarts(server) == 1
    lines = [line for line in log.read_text().splitlines() if line.startswith("cmdcl-serve: warning:")]
    assert lines == ["cmdcl-serve: warning: the server stopped on its own (tritonserver killed by SIGSEGV); restart 1 in 0.5 s"]


def test_a_crash_loop_ends_with_one_line(server):
    """Runs last: with --restart 1, a second stop within 60 s ends cmdcl-serve (exit 1)."""
    crash_tritonserver(server)
    assert server["process"].wait(timeout=90) == 1
    text = server["log"].read_text()
    errors = [line for line in text.splitlines() if line.startswith("cmdcl-serve: error:")]
    assert errors == ["cmdcl-serve: error: the server stopped on its own (tritonserver killed by SIGSEGV), "
                      "after 1 restart(s) within 60 s"], text[-3000:]


GRPC_READY = """
import sys, tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException
sys.stdin.read()  # until the test says
try:
    print(grpc.InferenceServerClient(sys.argv[1]).is_server_ready(client_timeout=30))
except InferenceServerException as error:
    print(error.status().removeprefix("StatusCode."))
"""


def crash_tritonserver(server):
    """SIGSEGV to the module's tritonserver; returns once it is dead (its ports closed)."""
    pid = next(int(pid) for pid, argv in _group_commands(server["process"].pid) if argv[0].endswith(b"/tritonserver"))
    os.kill(pid, signal.SIGSEGV)
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "tritonserver outlived SIGSEGV by 30 s"
        time.sleep(0.05)


def _alive(pid) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
