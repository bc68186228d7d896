"""Timing, memory and machine facts for cmdcl-bench.

CPU stages are timed with the wall clock (time.perf_counter); CUDA stages with
CUDA events recorded on the current stream around each call, after warm-up.
Peak host memory is the resident set size's high-water mark during a stage
(Linux: VmHWM, reset before the stage through /proc/self/clear_refs; elsewhere
the process's lifetime peak, and the record says so); device memory is
PyTorch's peak allocation on the GPU (allocations by ONNX Runtime or TensorRT
outside PyTorch are not seen).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

from ..errors import first_line

LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "av", "numpy", "triton", "tensorrt", "tensorrt-rtx")


def percentiles(times_ms) -> dict:
    """p50 / p90 / p99 of a list of latencies in milliseconds."""
    p50, p90, p99 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 90, 99])
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4)}


def time_calls(fn, iters: int, warmup: int, cuda: bool = False) -> list[float]:
    """Latency of `iters` calls of fn() in ms, after `warmup` untimed calls;
    CUDA events when `cuda`, else the wall clock."""
    for _ in range(warmup):
        fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def time_steps(steps, skip: int = 0) -> list[float]:
    """Wall-clock ms between consecutive items of an iterator (the first item
    counts from the call); the first `skip` intervals are warm-up and dropped."""
    times, last = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
    return times[skip:]


class PeakMemory:
    """Peak host RSS (MB) and PyTorch's peak CUDA allocation (MB, when `cuda`) over a `with` block."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.host_mb: float | None = None
        self.device_mb: float | None = None
        self.host_exact = False  # False: lifetime peak of the process (no per-stage reset here)

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.host_exact = True
        except OSError:
            self.host_exact = False
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.host_mb = round(_host_peak_mb(self.host_exact), 1)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.device_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return False


def _host_peak_mb(from_proc: bool) -> float:
    if from_proc:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def machine_info(device: str, threads: int) -> dict:
    """What produced the figures: CPU, cores, threads used, GPU, driver, library versions, load."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "gpu": None,
        "driver": None,
        "cuda": None,
        "load_average": load_average(),
        "rss_baseline_mb": round(_rss_mb(), 1),
        "versions": {name: _version(name) for name in LIBRARIES if _version(name)},
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _proc_value(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file, if any."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    return _proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _rss_mb() -> float:
    value = _proc_value("/proc/self/status", "VmRSS:")  # "123456 kB"
    return int(value.split()[0]) / 1024 if value else float("nan")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return first_line(out) or None


def measured_peaks(device: str, threads: int, seconds: float = 1.0) -> dict:
    """The machine's practical peaks, measured here (best of ~`seconds` of
    repetitions): fp32 GEMM FLOP/s through PyTorch (n = 2048 on CPU, 8192 on
    GPU; plus fp16 on GPU) and copy bandwidth (bytes read + written per
    second, a 256 MiB buffer). The backends' achieved FLOP/s and bytes/s are
    reported as fractions of these."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    dtypes = {"fp32": torch.float32} if device == "cpu" else {"fp32": torch.float32, "fp16": torch.float16}
    n = 2048 if device == "cpu" else 8192
    cuda = device == "cuda"
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        reps = _reps_for(lambda: torch.mm(a, b), seconds, cuda)
        ms = min(time_calls(lambda: torch.mm(a, b), reps, 1, cuda))
        peaks[f"gemm_{name}_flops"] = 2 * n**3 / (ms / 1e3)
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)  # 256 MiB
    target = torch.empty_like(source)
    reps = _reps_for(lambda: target.copy_(source), seconds, cuda)
    ms = min(time_calls(lambda: target.copy_(source), reps, 1, cuda))
    peaks["copy_bytes_per_s"] = 2 * source.numel() * 4 / (ms / 1e3)
    return peaks


def _reps_for(fn, seconds: float, cuda: bool) -> int:
    one = max(float(np.median(time_calls(fn, 2, 1, cuda))), 1e-3)
    return int(min(max(3, seconds * 1e3 / one), 200))
