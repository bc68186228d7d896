"""The front of `cmdcl-serve`: what clients connect to. It checks each request's
declared shapes and JSON before the bundled tritonserver (Triton 2.51) sees them,
and forwards the rest, unchanged, to tritonserver on internal loopback ports.

Triton 2.51 trusts what a request declares: its HTTP endpoint allocates a JSON
input's shape before checking it (a 103-byte request declaring a batch of 2^32
aborts it with std::bad_alloc), its JSON parser recurses without a bound (a request
nested 40,000 deep overflows its stack), and its core reads the batch dimension
as 32 bits (a batch of 2^32 + 1 with one clip of data is answered as a batch of
1). Nothing in its configuration or in PyTriton's refuses these first, and the
model functions only see the truncated shape, so the check is here:

- every input's shape is a list of integers in [0, 2^31) declaring at most
  `input_limit` bytes;
- every body Triton would parse is JSON that Python parses too: nested at most
  about 1,000 deep (Python's recursion limit), no duplicate keys (RapidJSON
  reads the first, Python the last), a binary header length within the body;
- HTTP bodies come with a Content-Length up to `body_limit`, uncompressed.

Connections and streams are bounded (a thread each), and a client that holds them
without sending a request (slowloris: headers or a body dripped byte by byte, idle
gRPC streams) cannot lock others out: when all are taken, a new one evicts the one
that has waited longest for its client, never one whose request is under way.

Everything else (wrong dtype, shape or batch) is still Triton's to refuse, with
its own messages. While tritonserver is down or restarting, the front answers
503 (HTTP, also /v2/health/ready) or UNAVAILABLE (gRPC) at once. With metrics on,
the metrics port adds `cmdcl_serve_restarts_total` to Triton's metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIM_LIMIT = 2**31  # Triton 2.51 casts the batch dimension to 32 bits (and compares it as a signed int)
INPUT_LIMIT = 64 * 2**20  # bytes an input may declare, unless a valid input is larger (newer Triton's default)
CONNECTIONS = 512  # HTTP connections at once (a thread each, and one to tritonserver); see _HttpServer.evict
IDLE_S = 30  # an HTTP connection silent this long is closed
EVICT_WAIT_S = 2.0  # how long a new HTTP connection waits for the one it evicted to let go of its thread
BODIES_HELD, BODIES_MIN_BYTES = 2, 2**30  # HTTP bodies held at once: two of the largest, or 1 GiB (see _ByteBudget)
BODY_WAIT_S = 10  # how long a request waits for room for its body before a 503
GRPC_CALLS = 64  # unary gRPC calls at once (a thread each); more get RESOURCE_EXHAUSTED
GRPC_STREAMS = 16  # ModelStreamInfer streams at once (each holds a thread while it lasts); see _GrpcForwarder.admit
DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
               "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade",
              "proxy-connection", "expect"}  # the front answered Expect: 100-continue itself
GRPC_SERVICE = "/inference.GRPCInferenceService/"
UNAVAILABLE = "the server is not available (tritonserver is restarting)"


def shape_refusal(inputs, input_limit: int) -> str | None:
    """Why an infer request with these (name, datatype, shape) inputs must not reach Triton, or None."""
    for name, datatype, shape in inputs:
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < DIM_LIMIT for d in shape):
            return f"input {name!r}: shape {shape} must be a list of integers from 0 to {DIM_LIMIT - 1}"
        declared = math.prod(shape) * DTYPE_BYTES.get(datatype, 1)
        if declared > input_limit:
            return f"input {name!r}: shape {shape} declares {declared} bytes, over the limit of {input_limit}"
    return None


def _unique_keys(pairs):
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key in an object")
    return dict(pairs)


def body_refusal(body: bytes, header_length: str | None, input_limit: int) -> str | None:
    """Why an HTTP body (Triton parses its JSON part: all of it, or the first
    Inference-Header-Content-Length bytes) must not reach Triton, or None."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            return f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the body"
        body = body[:int(header_length)] or body
    if not body:
        return None
    try:
        document = json.loads(body.decode("utf-8", "surrogateescape"), object_pairs_hook=_unique_keys)
    except RecursionError:
        return "the request's JSON is nested too deeply"
    except ValueError as exc:
        return f"the request is not valid JSON ({exc})"
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list):
        return None
    return shape_refusal([(i.get("name"), i.get("datatype"), i.get("shape")) if isinstance(i, dict) else (None, None, None)
                          for i in inputs], input_limit)


def grpc_refusal(request: bytes, input_limit: int) -> str | None:
    """Why a serialized gRPC ModelInferRequest must not reach Triton, or None."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    try:
        message = service_pb2.ModelInferRequest.FromString(request)
    except DecodeError as exc:
        return f"the request is not a ModelInferRequest ({exc})"
    return shape_refusal([(i.name, i.datatype, list(i.shape)) for i in message.inputs], input_limit)


class Front:
    """The public HTTP, gRPC and metrics ports of `config` (a ServeConfig), forwarding
    to the tritonserver given to `connect` until `disconnect`."""

    def __init__(self, config, input_limit: int, body_limit: int):
        self.config, self.input_limit, self.body_limit = config, input_limit, body_limit
        self.bodies = _ByteBudget(max(BODIES_HELD * body_limit, BODIES_MIN_BYTES))
        # a gRPC message holds its tensors as bytes (or packed numbers, at most 2 bytes per uint8), not as JSON text
        self.message_limit = min(body_limit, 2 * input_limit + 2**20)
        self.restarts = 0  # counted by the supervisor, shown on the metrics port
        self.backend = None  # the ServeConfig of the tritonserver that answers, None while it is down
        self.channel = None  # gRPC channel to that tritonserver
        self._servers = []

    def connect(self, backend) -> None:
        import grpc

        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}", options=options)
        self.backend = backend

    def disconnect(self) -> None:
        self.backend = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def __enter__(self):
        try:
            if self.config.http_port is not None:
                self._serve_http(self.config.host, self.config.http_port, _ApiHandler)
            if self.config.metrics_port is not None:
                self._serve_http(self.config.metrics_host, self.config.metrics_port, _MetricsHandler)
            self._serve_grpc()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        self.disconnect()
        for server in self._servers:
            server.stop()
        self._servers.clear()

    def _serve_http(self, host, port, handler):
        server = _HttpServer((host, port), handler, self)
        thread = threading.Thread(target=server.serve_forever, name=f"cmdcl-serve-front-{port}", daemon=True)
        thread.start()
        self._servers.append(server)

    def _serve_grpc(self):
        import grpc

        calls = GRPC_CALLS + GRPC_STREAMS  # streams beyond GRPC_STREAMS evict one (_GrpcForwarder.admit): unary calls keep theirs
        server = grpc.server(ThreadPoolExecutor(max_workers=calls, thread_name_prefix="cmdcl-serve-front-grpc"),
                             handlers=[_GrpcForwarder(self)], maximum_concurrent_rpcs=calls,
                             options=[("grpc.max_receive_message_length", self.message_limit),
                                      ("grpc.max_send_message_length", -1)])
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        server.add_insecure_port(f"{host}:{self.config.grpc_port}")
        server.start()
        self._servers.append(_GrpcServer(server))

    def metrics(self) -> bytes:
        return (b"# HELP cmdcl_serve_restarts_total Times cmdcl-serve started tritonserver again after it stopped on its own\n"
                b"# TYPE cmdcl_serve_restarts_total counter\n"
                b"cmdcl_serve_restarts_total %d\n" % self.restarts)


class _ByteBudget:
    """The bytes of HTTP bodies the front holds at once (each is read whole, checked, then forwarded): a body is
    read only once its Content-Length fits, so memory stays bounded however many clients send large bodies."""

    def __init__(self, total: int):
        self.free, self.changed = total, threading.Condition()

    def take(self, size: int) -> bool:
        """Reserve `size` bytes, waiting up to BODY_WAIT_S; False if they never came free."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.free >= size, BODY_WAIT_S):
                return False
            self.free -= size
            return True

    def give(self, size: int) -> None:
        with self.changed:
            self.free += size
            self.changed.notify_all()


class _GrpcServer:
    def __init__(self, server):
        self.server = server

    def stop(self):
        self.server.stop(grace=1).wait(5)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 makes bursts retry after 1 s)

    def __init__(self, address, handler, front):
        self.front = front
        self.slots = threading.BoundedSemaphore(CONNECTIONS)
        self.connections = threading.local()  # each handler thread's connection to tritonserver
        # each client connection's socket -> (what it waits for, since when): "client" while it waits for the client
        # (the next request, its headers or body), "triton" while its request is with tritonserver or being answered
        self.waiting: dict = {}
        self.waiting_lock = threading.Lock()
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)

    def waits_for(self, sock, party: str) -> None:
        with self.waiting_lock:
            self.waiting[sock] = party, time.monotonic()

    def evict(self) -> None:
        """Free a slot: close the connection that has waited longest for its client (an idle keep-alive, or a client
        dripping its headers or body), never one whose request is with tritonserver. Its thread ends at once."""
        with self.waiting_lock:
            idle = [(since, id(sock), sock) for sock, (party, since) in self.waiting.items() if party == "client"]
        if idle:
            with contextlib.suppress(OSError):
                min(idle)[2].shutdown(socket.SHUT_RDWR)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.evict()
            if not self.slots.acquire(timeout=EVICT_WAIT_S):
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.waiting_lock:
                self.waiting.pop(request, None)
            self.slots.release()

    def handle_error(self, request, client_address):
        """A client that went away is no error; anything else is one line (socketserver would print a traceback)."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            sys.stderr.write(f"cmdcl-serve: warning: request from {client_address[0]} failed: {type(error).__name__}: {error}\n")

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_S

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers, then body: no Nagle wait

    def handle_one_request(self):
        self.server.waits_for(self.connection, "client")  # for the next request line, headers and body
        super().handle_one_request()

    def log_message(self, format, *args):  # Triton logs the requests that reach it
        pass

    def answer(self, status: int, body: bytes, headers=(("Content-Type", "application/json"),)):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str):
        self.answer(status, json.dumps({"error": message}).encode())

    def forward(self, port: int, body: bytes | None) -> tuple[int, bytes, list]:
        """(status, body, headers) of the same request sent to tritonserver at `port`
        (one kept-alive connection per thread); OSError when it cannot be reached."""
        local = self.server.connections
        connection = getattr(local, "connection", None)
        if connection is None or connection.port != port:
            connection = local.connection = _TritonConnection("127.0.0.1", port)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_BY_HOP}
        try:
            connection.request(self.command, self.path, body, headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise OSError(str(exc)) from exc
        return response.status, answer, [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]


class _TritonConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a large body goes after its headers


class _ApiHandler(_Handler):
    """Triton's HTTP/REST endpoint behind the checks."""

    def do_GET(self):
        front = self.server.front
        length = self.headers.get("Content-Length", "0")
        if self.headers.get("Transfer-Encoding"):
            refusal = 411, "send the request body with a Content-Length (chunked bodies are not accepted)"
        elif self.headers.get("Content-Encoding", "identity").lower() != "identity":
            refusal = 415, "compressed request bodies are not accepted"
        elif not length.isdigit() or int(length) > front.body_limit:
            refusal = 413, f"Content-Length must be a number of bytes up to {front.body_limit}"
        else:
            refusal = None
        if refusal:  # the body is left unread: the connection cannot carry another request
            self.close_connection = True
            return self.error(*refusal)
        if not front.bodies.take(int(length)):
            self.close_connection = True
            return self.error(503, "too many request bodies in the server at once; try again")
        try:
            self.check_and_forward(front, int(length))
        finally:
            front.bodies.give(int(length))

    do_POST = do_GET

    def check_and_forward(self, front, length: int):
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return
        self.server.waits_for(self.connection, "triton")
        refusal = body_refusal(body, self.headers.get("Inference-Header-Content-Length"), front.input_limit)
        if refusal:
            return self.error(400, refusal)
        backend = front.backend
        if backend is None:
            return self.error(503, UNAVAILABLE)
        try:
            self.answer(*self.forward(backend.http_port, body if body or self.command == "POST" else None))
        except OSError:  # tritonserver stopped meanwhile
            self.error(503, UNAVAILABLE)


class _MetricsHandler(_Handler):
    """Triton's Prometheus metrics (while it runs) and the front's own."""

    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            return self.error(404, "only /metrics is served here")
        front, triton = self.server.front, b""
        backend = front.backend
        if backend is not None:
            with contextlib.suppress(OSError):
                status, answer, _ = self.forward(backend.metrics_port, None)
                triton = answer if status == 200 else b""
        self.answer(200, triton + front.metrics(), (("Content-Type", "text/plain; charset=utf-8; version=0.0.4"),))


class _GrpcForwarder:
    """Triton's gRPC service behind the checks: every method forwarded as bytes;
    ModelInfer and each ModelStreamInfer message checked first."""

    def __init__(self, front):
        self.front = front
        self.streams: dict = {}  # the context of each stream -> when its client last sent a message
        self.streams_lock = threading.Lock()

    def admit(self, context) -> None:
        """Count a new stream in; when GRPC_STREAMS are open, cancel the one whose client has been silent longest
        (idle streams cannot lock others out; the newest stream always gets in)."""
        with self.streams_lock:
            if len(self.streams) >= GRPC_STREAMS:
                idlest = min(self.streams, key=self.streams.get)
                del self.streams[idlest]
                idlest.cancel()
            self.streams[context] = time.monotonic()

    def heard_from(self, context) -> None:
        with self.streams_lock:
            if context in self.streams:
                self.streams[context] = time.monotonic()

    def service(self, details):
        import grpc

        method = details.method
        if not method.startswith(GRPC_SERVICE):
            return None  # UNIMPLEMENTED
        if method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self.stream(method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.unary(method, request, context))

    def triton(self, context):
        """The channel to tritonserver; UNAVAILABLE to the client while it is down."""
        import grpc

        channel = self.front.channel
        if channel is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)
        return channel

    def unary(self, method, request: bytes, context):
        import grpc

        if method.endswith("/ModelInfer"):
            refusal = grpc_refusal(request, self.front.input_limit)
            if refusal:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        call = self.triton(context).unary_unary(method)
        try:
            return call(request, timeout=_timeout(context), metadata=_metadata(context))
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def stream(self, method, requests, context):
        """A refused message ends the stream (after the answers to the messages before it) with INVALID_ARGUMENT."""
        import grpc

        refused = []

        def checked():
            for request in requests:
                self.heard_from(context)
                refusal = grpc_refusal(request, self.front.input_limit)
                if refusal:
                    refused.append(refusal)
                    return
                yield request

        channel = self.triton(context)
        self.admit(context)
        try:
            responses = channel.stream_stream(method)(checked(), timeout=_timeout(context), metadata=_metadata(context))
            context.add_callback(responses.cancel)  # the client went away, or its stream was evicted: so does this call
            yield from responses
        except grpc.RpcError as exc:
            if context.is_active():
                context.abort(exc.code(), exc.details())
        finally:
            with self.streams_lock:
                self.streams.pop(context, None)
        if refused:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0])


def _timeout(context) -> float | None:
    """The client's deadline for the forwarded call (gRPC reports no deadline as a far-off one)."""
    remaining = context.time_remaining()
    return remaining if remaining < 10**6 else None


def _metadata(context):
    return [(key, value) for key, value in context.invocation_metadata() if key != "user-agent"]
