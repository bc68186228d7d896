"""The benchmark: every stage of the runtime timed through the real code paths (the stages: `stages.py`).

For each backend, one at a time (so host memory is that backend's), the model stages at each batch size;
before the first, once, the video stages on that model's clip shape. With no --engine the models are
random-weight CMDCL models of the chosen preset (`models.py`). The report gathers the machine, the
settings, the FLOP/byte floors, the records, the comparisons between them (`report.py`) and the skipped stages.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..artifacts import stream_grid
from ..errors import first_line
from ..runtime.backends import Backend, BackendError, ModelInfo, TorchBackend
from . import floors as floor_counts
from .measure import PeakMemory, load_average, machine_info, measured_peaks, percentiles, time_calls
from .models import BenchModels, engine_label
from .report import add_floor_fractions, comparisons
from .stages import BENCH_VIDEO_STAGES, MODEL_STAGES, STAGES, VIDEO_STAGES, ModelTarget, SkipStage, VideoInputs
from .variants import BACKENDS, CPU_DEFAULT, GPU_DEFAULT, TORCH_VARIANTS, TorchVariant
from .videos import bench_video


@dataclass
class BenchSettings:
    preset: str = "tiny"
    engines: tuple = ()  # model files; empty: random-weight models of `preset`
    backends: tuple = ()  # empty: CPU_DEFAULT or GPU_DEFAULT (with engines: each file's own backend)
    batches: tuple = (1,)
    frames: int | None = None  # F override for the generated models
    classes: int = 200
    iters: int = 10
    warmup: int = 2
    device: str = "auto"
    threads: int | None = None
    stages: tuple = STAGES
    video: Path | None = None  # default: a generated 720p video long enough for the stream updates
    long_video: Path | None = None  # default: a generated 720p H.264 with sparse keyframes
    long_minutes: float = 10.0
    stride_frames: int | None = None  # stream mode; default the model's (F/2)
    sampling: str = "exact"  # read_clip's sampling in decode_video and end_to_end
    cuda_graphs: bool = False
    workers: int | None = None  # end_to_end_workers' N; default: the usable cores


@dataclass
class Record:
    """One stage of one backend at one batch size (a JSON record)."""

    backend: str  # "torch", "ort", "trt", a torch variant, or "pyav" for decoding
    stage: str
    batch: int  # clips (or streams) per call
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # in `unit`: clips/s, windows/s or frames/s at the p50 latency
    unit: str
    video_s_per_s: float | None  # seconds of video processed per second, where a stage consumes video
    peak_mem_mb: float  # peak host RSS during the stage
    device_mem_mb: float | None  # peak PyTorch CUDA allocation during the stage
    iters: int  # timed calls (or window updates, grid frames)
    engine: str | None = None  # the --engine file, if one was given
    note: str = ""
    gflops_per_s: float | None = None  # FLOP floor of the stage / p50
    peak_flops_fraction: float | None = None  # of the measured GEMM peak
    floor_bytes_fraction: float | None = None  # clip: byte floor per second / measured copy bandwidth
    frames_per_sample: float | None = None  # video mode: frames decoded per sampled frame
    pipeline_efficiency: float | None = None  # end_to_end_parallel: max(decoding / N, model) / end to end; 1.0 is perfect overlap


class Bench:
    """One benchmark run: `run()` returns the report (machine, settings, floors, records, comparisons, skipped)."""

    def __init__(self, settings: BenchSettings, progress=None, log=None, debug: bool = False):
        import torch

        self.s = settings
        self.device = resolve_device(settings.device)
        self.cuda = self.device == "cuda"
        self.threads = settings.threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.progress, self.debug = progress, debug
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.records: list[Record] = []
        self.skipped: list[dict] = []
        self.work = Path(tempfile.mkdtemp(prefix="cmdcl-bench-"))
        self.stride_seconds = 0.0  # the stream stages' stride, set from the first model
        self.models = BenchModels(settings, self.work, self.device, self.threads, self.log)

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> dict:
        s = self.s
        machine = machine_info(self.device, self.threads)
        self.log(f"cmdcl-bench: {machine['cpu']} ({machine['cores']} cores, {self.threads} threads), device {self.device}"
                 + (f" ({machine['gpu']})" if machine["gpu"] else "") + f", load average {machine['load_average']}")
        peaks = measured_peaks(self.device, self.threads)  # again at the end: the better of the two (others' load varies)
        info = video = stride_frames = None
        interrupted = False
        try:
            for label, load in self.plan_backends():
                backend = self.load_or_skip(label, load)
                if backend is None:
                    continue
                with backend:  # closed before the next one loads
                    if info is None:  # the first model sets F, the image size and the stream grid for the video stages
                        info = backend.info
                        stride_frames, video = self.measure_video_stages(info)
                    self.measure_model_stages(backend, label, video)
        except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT half-way: report what was measured
            if not self.records:
                raise
            interrupted = True
            self.log(f"cmdcl-bench: interrupted; reporting the {len(self.records)} measurements made so far")
        if info is None:
            raise BackendError("nothing to measure: no backend could run here (see the reasons above)")
        if not interrupted:
            peaks = {key: max(value, peaks[key]) for key, value in measured_peaks(self.device, self.threads).items()}
        cfg, num_classes = info.config, len(info.classes)
        floors_by_batch = {b: floor_counts.model_floors(cfg, num_classes, b) for b in s.batches} if cfg else {}
        add_floor_fractions(self.records, floors_by_batch, peaks)
        machine["load_average_end"] = load_average()
        return {
            "tool": "cmdcl-bench",
            "interrupted": interrupted,  # True: partial results, the run stopped half-way
            "toolkit_version": __version__,
            "machine": machine,
            "measured_peaks": peaks,
            "settings": {**_plain(asdict(s)), "device": self.device, "threads": self.threads, "num_frames": info.num_frames,
                         "image_size": info.image_size, "num_classes": num_classes, "stride_frames": stride_frames,
                         "video": str(video) if video else None},
            "config": cfg.to_dict() if cfg else None,
            "floors": {str(b): f for b, f in floors_by_batch.items()},
            "records": [asdict(r) for r in self.records],
            "comparisons": comparisons(self.records),
            "skipped": self.skipped,
        }

    def measure_video_stages(self, info: ModelInfo) -> tuple[int, Path | None]:
        """The video stages asked for, on the clip shape and stream grid of the model `info` describes; sets the
        stride of the stream stages. Returns the stride in grid frames and the bench video (None if none needs it)."""
        s = self.s
        grid_rate, _, model_stride = stream_grid(info.num_frames, (info.window_seconds,), info.stride_seconds)
        stride_frames = s.stride_frames or model_stride
        self.stride_seconds = stride_frames / grid_rate
        # long enough for the stream updates asked for: the first window, then warm-up, timed and one spare update
        seconds = (info.num_frames + (s.warmup + s.iters + 1) * stride_frames) / grid_rate + 1
        video = bench_video(s, seconds, self.log) if BENCH_VIDEO_STAGES & set(s.stages) else None
        inputs = VideoInputs(info, grid_rate, video, s, self.log)
        for stage, measure in VIDEO_STAGES.items():
            if stage in s.stages:
                measure(self, inputs)
        return stride_frames, video

    def measure_model_stages(self, backend: Backend, label: str, video: Path | None) -> None:
        """Every model stage asked for at every batch size; a stage that fails is skipped with the reason (--debug: raised)."""
        stages = [stage for stage in MODEL_STAGES if stage in self.s.stages]
        if "intervention" in stages and not isinstance(backend, TorchBackend):
            stages.remove("intervention")
            self.skip(label, "intervention", "the op runs inside this backend's graph; it is timed alone through PyTorch only")
        engine = str(backend.path) if self.s.engines else None
        for batch in self.s.batches:
            for stage in stages:
                try:
                    MODEL_STAGES[stage](self, ModelTarget(backend, label, batch, video, engine))
                except SkipStage as exc:
                    self.skip(label, stage, str(exc), batch)
                except (BackendError, RuntimeError, ValueError, ImportError) as exc:  # e.g. a GPU variant this stack cannot compile
                    if self.debug:
                        raise
                    self.skip(label, stage, f"failed: {first_line(exc)}", batch)

    # ---- backends ------------------------------------------------------------------------------
    def plan_backends(self) -> list:
        """[(name, loader)] in run order; names that cannot run here are skipped with the reason."""
        s = self.s
        if s.engines:
            backend = (s.backends or ("auto",))[0]
            if len(s.backends) > 1:
                raise BackendError("with --engine, give at most one --backend (it applies to every engine)")
            if self.gpu_only(backend):
                return []
            labels = [engine_label(path, backend) for path in s.engines]
            labels = [f"{label}:{Path(path).name}" if labels.count(label) > 1 else label for label, path in zip(labels, s.engines)]
            return [(label, lambda p=path: self.models.load_file(p, backend)) for label, path in zip(labels, s.engines)]
        names = list(s.backends or (GPU_DEFAULT if self.cuda else CPU_DEFAULT))
        if s.cuda_graphs and "torch-fp16-cudagraphs" not in names:
            names.append("torch-fp16-cudagraphs")
        plans = []
        for name in names:
            if name not in BACKENDS:
                raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
            if not self.gpu_only(name):
                plans.append((name, lambda n=name: self.models.load_generated(n)))
        return plans

    def gpu_only(self, name: str) -> bool:
        """True (and the backend skipped) when `name` needs a GPU and there is none."""
        variant = TORCH_VARIANTS.get(name)
        if self.cuda or not (name == "trt" or (variant and variant.needs_cuda)):
            return False
        self.skip(name, "all", "needs an NVIDIA GPU (no CUDA device visible to PyTorch)")
        return True

    def load_or_skip(self, name: str, load) -> Backend | None:
        try:
            return load()
        except (BackendError, ImportError, RuntimeError) as exc:
            if self.debug:
                raise
            self.skip(name, "all", f"could not load: {first_line(exc)}")
            return None

    # ---- recording -----------------------------------------------------------------------------
    def measure(self, backend: str, stage: str, batch: int, fn, clips: int, video_seconds: float | None = None, engine=None,
                note: str = "", cuda: bool = False, iters: int | None = None, warmup: int | None = None) -> Record:
        """Times `fn` (iters calls after warmup ones) and records it; `clips` per call give the throughput."""
        iters = iters or self.s.iters
        warmup = self.s.warmup if warmup is None else warmup
        if TORCH_VARIANTS.get(backend, TorchVariant()).compile_mode:
            warmup = max(warmup, 3)  # compilation, then CUDA graph recording, happen in the first calls
        with PeakMemory(cuda) as memory:
            times = time_calls(fn, iters, warmup, cuda)
        return self.add(backend, stage, batch, times, memory, "clips/s", clips, video_seconds, engine, note)

    def add(self, backend, stage, batch, times, memory: PeakMemory, unit: str, per_call: float, video_seconds,
            engine=None, note: str = "") -> Record:
        """Records times (ms) measured otherwise; `per_call` units per call give the throughput."""
        p = percentiles(times)
        seconds = p["p50_ms"] / 1e3
        if not memory.host_exact:
            note = (note + "; " if note else "") + "peak_mem_mb is the process's lifetime peak"
        record = Record(
            backend=backend, stage=stage, batch=batch, **p, throughput=round(per_call / seconds, 4), unit=unit,
            video_s_per_s=round(video_seconds / seconds, 3) if video_seconds else None, peak_mem_mb=memory.host_mb,
            device_mem_mb=memory.device_mb, iters=len(times), engine=engine, note=note,
        )
        self.records.append(record)
        if self.progress:
            self.progress(f"{backend} {stage} batch {batch}: p50 {p['p50_ms']:.2f} ms")
        return record

    def skip(self, backend: str, stage: str, reason: str, batch: int | None = None) -> None:
        self.skipped.append({"backend": backend, "stage": stage, "batch": batch, "reason": reason})
        self.log(f"cmdcl-bench: skipped {backend} {stage}" + (f" batch {batch}" if batch else "") + f": {reason}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: PyTorch sees no CUDA GPU on this machine")
    return device


def _plain(value):
    """Paths and tuples to JSON types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
