"""Talking to a served CMDCL model with tritonclient (HTTP or gRPC): classify a
video's frames, and a bounded load test that checks every answer.

    client = connect("127.0.0.1:8000", "http")
    frames = clip_frames(client, "video.mp4")          # F frames sampled as cmdcl-run does
    outputs = infer(client, "http", frames[None])      # logits, embedding, top_labels, top_scores

`load_test` runs N client threads against one address for a bounded time and
request count, records each request's latency, and compares every response's
logits with the offline runtime's for the same frames.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..artifacts import TOLERANCES, relative_error
from ..errors import first_line

PROTOCOLS = ("http", "grpc")
MODEL = "cmdcl"
OUTPUTS = ("logits", "embedding", "top_labels", "top_scores")


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def connect(url: str, protocol: str = "http", timeout_s: float = 60.0):
    """A tritonclient InferenceServerClient for `url` (host:port, no scheme)."""
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    return module.InferenceServerClient(url)


def input_shape(client, protocol: str, model: str = MODEL) -> list[int]:
    """The model's input shape without the batch axis: [F, H, W, 3] for cmdcl."""
    meta = client.get_model_metadata(model) if protocol == "http" else client.get_model_metadata(model, as_json=True)
    return [int(d) for d in meta["inputs"][0]["shape"][1:]]


def clip_frames(client, protocol: str, video, model: str = MODEL) -> np.ndarray:
    """The F frames of `video` the model wants, sampled and resized like `cmdcl-run --mode video`."""
    from ..data.video import RUNTIME_SAMPLING, read_clip

    f, size = input_shape(client, protocol, model)[:2]
    return read_clip(video, f, size, sampling=RUNTIME_SAMPLING).frames


def infer(client, protocol: str, frames: np.ndarray, model: str = MODEL, outputs=OUTPUTS,
          input_name: str = "frames", datatype: str | None = None) -> dict:
    """One request; returns the outputs as numpy arrays (top_labels decoded to str).
    Raises tritonclient.utils.InferenceServerException with the server's message."""
    module = _module(protocol)
    tensor = module.InferInput(input_name, list(frames.shape), datatype or _datatype(frames.dtype))
    tensor.set_data_from_numpy(frames)
    result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(name) for name in outputs])
    answer = {name: result.as_numpy(name) for name in outputs}
    if "top_labels" in answer:
        answer["top_labels"] = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else str(b))(answer["top_labels"])
    return answer


def _datatype(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


@dataclass
class LoadReport:
    clients: int
    requests: int = 0
    errors: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    latencies_ms: list = field(default_factory=list, repr=False)
    first_problem: str | None = None

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        return round(float(np.percentile(self.latencies_ms, q)), 2) if self.latencies_ms else None

    def summary(self) -> dict:
        return {"clients": self.clients, "requests": self.requests, "errors": self.errors, "mismatches": self.mismatches,
                "seconds": round(self.seconds, 3), "throughput_rps": round(self.throughput, 2),
                "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "first_problem": self.first_problem}


def load_test(url: str, protocol: str, inputs: list, expected: list, clients: int = 4, seconds: float = 5.0,
              max_requests: int = 1000, model: str = MODEL, tolerance: float = TOLERANCES["fp32"]) -> LoadReport:
    """`clients` threads, each with its own connection, send clips from `inputs`
    (frames [F, H, W, 3] each; round robin) until `seconds` pass or `max_requests`
    were sent in all. A response whose logits differ from `expected[i]` (the offline
    runtime's logits for inputs[i]) by more than `tolerance` relative error, or whose
    top label differs, is a mismatch."""
    if not inputs or len(inputs) != len(expected):
        raise ValueError("need one expected logits row per input clip")
    probe = connect(url, protocol)  # a server that is not there is one error, not max_requests of them
    try:
        if not probe.is_model_ready(model):
            raise ConnectionError(f"{url}: model {model!r} is not ready")
    finally:
        probe.close()
    report, lock = LoadReport(clients), threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(max_requests))

    def worker():
        client = connect(url, protocol)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                clip, ref = inputs[i % len(inputs)], expected[i % len(inputs)]
                started = time.perf_counter()
                try:
                    logits = infer(client, protocol, clip[None], model, outputs=("logits",))["logits"][0]
                    problem = None
                    if relative_error(logits, ref) > tolerance or logits.argmax() != ref.argmax():
                        problem = f"request {i}: logits differ from the offline result (rel err {relative_error(logits, ref):.2e})"
                except Exception as exc:  # InferenceServerException, connection errors: counted, reported
                    problem = f"request {i}: {type(exc).__name__}: {first_line(str(exc))}"
                    logits = None
                elapsed_ms = (time.perf_counter() - started) * 1e3
                with lock:
                    report.requests += 1
                    if logits is None:
                        report.errors += 1
                    else:
                        report.latencies_ms.append(elapsed_ms)
                        report.mismatches += problem is not None
                    report.first_problem = report.first_problem or problem
        finally:
            client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)  # a stuck request cannot hold the test past its network timeout
    report.seconds = time.monotonic() - started
    return report
