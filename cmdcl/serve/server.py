"""Serve a CMDCL runtime backend through PyTriton (the real Triton Inference Server,
bundled in the nvidia-pytriton wheel, runs without a GPU).

Three models, each with Triton's dynamic batching across requests, bound with
the inputs and outputs of the graphs they run (`cmdcl.artifacts.graph_io`):

    cmdcl          the full graph on whole clips, plus top_labels bytes [B, K], top_scores [B, K]
    frame_encoder  the frame_encoder graph
    head           the head graph

Triton checks dtypes and shapes against these configs and answers a bad request
with an error; what Triton 2.51 mishandles (declared shapes it allocates, 32-bit
batch dimensions, deeply nested JSON) the front refuses before Triton sees it
(`front.py`: clients connect to it, tritonserver listens on internal loopback
ports). The model functions check every request again, and refuse NaN/inf tokens
(`RequestError`; `cmdcl-serve` sets `sys.tracebacklimit = 0`, so PyTriton's answer
carries our message, not our frames and paths). Neither stops the server. The
inference itself is the runtime's `Backend.infer` (ONNX Runtime, TensorRT or
PyTorch), so served answers are the offline runtime's.

The models are in Triton's repository when tritonserver starts, so it opens its
ports (and `/v2/health/ready` answers 200) only once they are loaded. tritonserver
stopping on its own is supervised: started again after a back-off (0.5 s, doubling
up to 8 s), and `ServerDied` when it stopped more than `restarts` times within
RESTART_WINDOW_S.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import math
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from ..artifacts import GraphRole
from ..errors import CmdclError
from ..runtime.backends import Backend

DEFAULT_TOP_K = 5
DEFAULT_RESTARTS = 5  # within RESTART_WINDOW_S; one more stop ends cmdcl-serve
RESTART_WINDOW_S = 60.0
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
SERVED_GRAPHS: dict[str, GraphRole] = {"cmdcl": "full", "frame_encoder": "frame_encoder", "head": "head"}  # model -> graph


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int | None = 8000  # None: gRPC only
    grpc_port: int = 8001
    metrics_port: int | None = None  # Prometheus metrics off unless a port is given
    metrics_host: str = "127.0.0.1"
    max_batch: int = 8  # clips per cmdcl/head call, frames per frame_encoder call
    queue_delay_us: int = 2000  # how long Triton waits to fill a batch
    top_k: int = DEFAULT_TOP_K

    def ports(self) -> dict:
        """option name -> (address, port) of every port tritonserver will listen on."""
        ports = {"--http-port": (self.host, self.http_port), "--grpc-port": (self.host, self.grpc_port)}
        if self.http_port is None:
            del ports["--http-port"]
        if self.metrics_port is not None:
            ports["--metrics-port"] = (self.metrics_host, self.metrics_port)
        return ports


class RequestError(CmdclError, ValueError):
    """A request the model cannot answer. PyTriton sends the message to the client."""


class ServerDied(CmdclError, RuntimeError):
    """tritonserver (or a model's worker) stopped without being asked to."""


def python_library_env() -> None:
    """Point the loader at this interpreter's libpython first: Triton's Python-backend
    stub links libpython3.X by name and may otherwise pick the system's copy, whose C
    modules disagree with this interpreter's standard library."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def check_ports(config: ServeConfig) -> None:
    """Raise OSError naming the option and port when one cannot be listened on (another
    process holds it, or the address is not this machine's): tritonserver would only
    fail later, and PyTriton would wait two minutes for it."""
    for option, (host, port) in config.ports().items():
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
                probe.bind(address)
                probe.listen()
        except OSError as exc:
            reason = "is in use by another process" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror or exc})"
            raise OSError(f"{host}:{port} ({option}) {reason}") from None


def inputs(info) -> dict:
    """model name -> (input name, dtype, shape without the batch axis): its graph's one input."""
    specs = {}
    for model, role in SERVED_GRAPHS.items():
        ((name, (dtype, shape)),) = info.io(role)[0].items()
        specs[model] = (name, np.dtype(dtype).type, tuple(shape[1:]))
    return specs


def model_functions(backend: Backend, top_k: int = DEFAULT_TOP_K, max_batch: int = 8) -> dict:
    """name -> function(list of PyTriton requests) -> list of output dicts; what each served model computes.
    Each request is checked before the batch is formed (`RequestError`)."""
    classes = np.array([name.encode() for name in backend.info.classes], dtype=object)
    k = min(top_k, len(classes))

    def clips(frames):
        outputs = backend.infer("full", {"frames": frames})
        probabilities = backend.probabilities(outputs["logits"])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return {**outputs, "top_labels": classes[order],
                "top_scores": np.take_along_axis(probabilities, order, axis=1).astype(np.float32)}

    computes = {"cmdcl": clips,
                "frame_encoder": lambda frames: backend.infer("frame_encoder", {"frames": frames}),
                "head": lambda tokens: backend.infer("head", {"tokens": tokens})}
    return {name: _batched(name, *spec, max_batch, computes[name]) for name, spec in inputs(backend.info).items()}


def _batched(model, name, dtype, shape, max_batch, compute):
    """What PyTriton's @batch does (one array from all requests, the outputs split back),
    with every request checked first. PyTriton can only fail a whole batch: the error
    goes to every request batched with a bad one. An unexpected failure is one line to
    the clients, its traceback in the server log."""
    expected = f"{np.dtype(dtype)} [B, {', '.join(map(str, shape))}] with 1 <= B <= {max_batch}"

    def infer(requests):
        arrays = []
        for request in requests:
            array = request.data.get(name)
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape[1:] != shape \
                    or not 1 <= len(array) <= max_batch:
                got = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else "nothing"
                raise RequestError(f"model {model!r}: input {name!r} must be {expected}, got {got}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():  # NaN in, NaN out: Triton would write it into JSON
                raise RequestError(f"model {model!r}: input {name!r} has NaN or infinite values")
            arrays.append(array)
        try:
            outputs = compute(np.concatenate(arrays))
        except Exception as exc:  # the backend's own errors: the client learns the type, the log the rest
            sys.stderr.write(f"cmdcl-serve: model {model!r} failed:\n" + "".join(traceback.format_exception(exc, limit=50)))
            raise RequestError(f"model {model!r}: inference failed ({type(exc).__name__}); see the server log") from None
        ends = np.cumsum([len(array) for array in arrays])
        return [{key: value[end - len(array):end] for key, value in outputs.items()} for array, end in zip(arrays, ends)]

    return infer


def bind_models(triton, backend: Backend, config: ServeConfig) -> list[str]:
    """Bind the three models to a pytriton.triton.Triton; returns their names."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    info = backend.info
    k = min(config.top_k, len(info.classes))
    outputs = {model: [Tensor(name=name, dtype=np.dtype(dtype).type, shape=tuple(shape[1:]))
                       for name, (dtype, shape) in info.io(role)[1].items()] for model, role in SERVED_GRAPHS.items()}
    outputs["cmdcl"] += [Tensor(name="top_labels", dtype=bytes, shape=(k,)), Tensor(name="top_scores", dtype=np.float32, shape=(k,))]
    model_config = ModelConfig(max_batch_size=config.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us))
    specs = inputs(info)
    for name, function in model_functions(backend, config.top_k, config.max_batch).items():
        input_name, dtype, shape = specs[name]
        triton.bind(model_name=name, infer_func=function, inputs=[Tensor(name=input_name, dtype=dtype, shape=shape)],
                    outputs=outputs[name], config=model_config, strict=True)
    return list(specs)


def triton_config(config: ServeConfig):
    from pytriton.triton import TritonConfig

    metrics = config.metrics_port is not None
    return TritonConfig(allow_http=config.http_port is not None, http_address=config.host, http_port=config.http_port,
                        grpc_address=config.host, grpc_port=config.grpc_port,
                        grpc_infer_allocation_pool_size=0,  # else every rejected large gRPC request keeps its buffer
                        allow_metrics=metrics, allow_cpu_metrics=metrics, allow_gpu_metrics=False,
                        metrics_port=config.metrics_port, metrics_address=config.metrics_host if metrics else None,
                        exit_timeout_secs=5)


def serve(backend: Backend, config: ServeConfig, on_ready=None, restarts: int = DEFAULT_RESTARTS,
          on_restart=None) -> None:
    """Serve until SIGINT or SIGTERM (in the main thread). `on_ready(model names)` runs each
    time the models are loaded. When tritonserver stops on its own, `on_restart(reason, n,
    delay_s)` runs and it is started again after the delay; meanwhile the front refuses
    requests (503, UNAVAILABLE). ServerDied when it stops more than `restarts` times within
    RESTART_WINDOW_S, or before it was ever ready."""
    from .front import Front

    python_library_env()
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()
        raise KeyboardInterrupt  # leaves the wait; the with-blocks around it stop tritonserver, the workers, the front

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    input_limit, body_limit = request_limits(backend, config)
    stops = collections.deque()  # when tritonserver stopped, within the window
    try:
        with Front(config, input_limit, body_limit) as front:
            while True:
                internal = internal_config(config)
                started = []

                def ready(names):
                    started.append(names)
                    front.connect(internal)
                    if on_ready:
                        on_ready(names)

                try:
                    reason = _serve_once(backend, internal, ready)
                except ServerDied as exc:
                    reason = str(exc)
                finally:
                    front.disconnect()
                now = time.monotonic()
                while stops and now - stops[0] > RESTART_WINDOW_S:
                    stops.popleft()
                if stopping.is_set():
                    return
                if not (started or front.restarts):  # never ready: starting again would fail the same way
                    raise ServerDied(reason)
                if len(stops) >= restarts:
                    raise ServerDied(reason + (f", after {len(stops)} restart(s) within {RESTART_WINDOW_S:.0f} s"
                                               if restarts else ""))
                stops.append(now)
                delay = min(FIRST_BACKOFF_S * 2 ** (len(stops) - 1), MAX_BACKOFF_S)
                front.restarts += 1
                if on_restart:
                    on_restart(reason, front.restarts, delay)
                time.sleep(delay)
    except KeyboardInterrupt:
        if stopping.is_set():
            return
        raise


def internal_config(config: ServeConfig) -> ServeConfig:
    """`config` with tritonserver's ports: free loopback ports that only the front uses
    (Triton's gRPC port always: the front forwards gRPC there)."""
    ports = iter(_free_loopback_ports(3))
    return dataclasses.replace(config, host="127.0.0.1", metrics_host="127.0.0.1", grpc_port=next(ports),
                               http_port=next(ports) if config.http_port is not None else None,
                               metrics_port=next(ports) if config.metrics_port is not None else None)


def _free_loopback_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    with contextlib.ExitStack() as stack:
        for probe in sockets:
            stack.enter_context(probe)
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]


def request_limits(backend: Backend, config: ServeConfig) -> tuple[int, int]:
    """(bytes an input may declare, bytes an HTTP body or gRPC message may have): the front's
    limits, with room for the largest valid request (JSON text takes up to ~7 characters
    per byte of float32 data)."""
    from .front import INPUT_LIMIT

    largest = max(config.max_batch * math.prod(shape) * np.dtype(dtype).itemsize
                  for _, dtype, shape in inputs(backend.info).values())
    return max(INPUT_LIMIT, largest), 8 * largest + 2**20


def _serve_once(backend: Backend, config: ServeConfig, on_ready) -> str:
    """One tritonserver, from start to its end; returns how it ended."""
    from pytriton.triton import Triton, TritonLifecyclePolicy

    # The models are bound before tritonserver starts, into its local repository, so it loads them
    # before it opens its ports: until then /v2/health/ready cannot answer 200.
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    with Triton(config=triton_config(config), triton_lifecycle_policy=policy) as triton:
        names = bind_models(triton, backend, config)
        with _watching_start(triton):
            triton.run()
        if on_ready:
            on_ready(names)
        while triton.is_alive():  # tritonserver and every model's worker (PyTriton's serve() would start a dead server again)
            time.sleep(0.5)
        return _how_it_ended(triton)  # before the with-block stops a tritonserver that still runs


@contextlib.contextmanager
def _watching_start(triton):
    """While PyTriton starts tritonserver and connects to it, a tritonserver that exits
    (a port taken meanwhile, a crash) would make it wait two minutes for the server:
    a watcher thread signals the main thread, which raises ServerDied at once."""
    def died(signum, frame):
        raise ServerDied(_how_it_ended(triton) + " while starting")

    started = threading.Event()

    def watch():
        while not started.wait(0.2):
            if _exit_code(triton) is not None:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, died)
    watcher = threading.Thread(target=watch, name="cmdcl-serve-start-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        started.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def _exit_code(triton) -> int | None:
    """tritonserver's exit status (negative: killed by that signal), None while it runs or
    before it started; read from PyTriton's private handle on the process (sh's)."""
    process = getattr(getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None), "process", None)
    return getattr(process, "exit_code", None)


def _how_it_ended(triton) -> str:
    code = _exit_code(triton)
    if code is None:
        return "the server stopped on its own (a model's worker ended)"
    if code < 0 and -code in signal.valid_signals():
        return f"the server stopped on its own (tritonserver killed by {signal.Signals(-code).name})"
    return f"the server stopped on its own (tritonserver exit status {code})"
