"""The benchmark: every stage of the runtime timed through the real code paths.

For each backend, one at a time (so host memory is that backend's):

    decode_video    read_clip: F frames over the whole bench video (pyav)
    decode_stream   iter_grid_frames: one grid frame of stream mode (pyav)
    preprocess      frame_to_rgb (colour conversion, resize, crop) of F decoded frames;
                    mean/std normalisation is inside the graphs (counted in frame_encoder)
    frame_encoder   Backend.encode_frames on B*F frames
    head            Backend.classify_tokens on B windows of tokens
    intervention    cmdcl.kernels.causal_intervention alone (PyTorch backends only;
                    inside ONNX Runtime / TensorRT graphs it is not reachable alone)
    clip            Backend.classify_clips: the whole model on B clips of F frames
    end_to_end      Recognizer.predict_many: decode + classify B videos
    end_to_end_workers  Recognizer.predict_many over a batch of WORKER_FILES videos, decoded in the main
                    process ("end_to_end_serial") and by N worker processes ("end_to_end_parallel"),
                    with the pipeline's efficiency (see measure_workers)
    stream_update   Recognizer.stream_many over B streams: one window update (decoding
                    the new grid frames, encoding them once, one head call); also
                    stream_update_model, the part of it spent in the backend
    long_video      read_clip on a long video, seek-based vs one sequential pass
    stream_grid     live streams per CPU core at a 1 fps grid: Recognizer.stream_many over
                    720p H.264 with a 1 s and a 2 s GOP, decoding every frame vs keyframes only
    decode_per_sample  read_clip with exact and with keyframe sampling, on the bench video and
                    the long one: time and frames decoded per sampled frame

With no --engine the models are random-weight CMDCL models of the chosen
preset (latency does not depend on the weights), saved as a checkpoint for
the PyTorch backends and exported to ONNX for ONNX Runtime (and built into a
TensorRT engine when TensorRT and a GPU are present).
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.video import SAMPLINGS, frame_to_rgb, iter_grid_frames, open_video, read_clip
from ..runtime.backends import Backend, BackendError, OrtBackend, TorchBackend, cache_dir, load_backend
from ..runtime.decode_pool import usable_cores
from ..runtime.recognizer import Recognizer
from . import floors as floor_counts
from ..cli.errors import first_line
from .measure import PeakMemory, load_average, machine_info, measured_peaks, percentiles, time_calls, time_steps

STAGES = ("decode_video", "decode_stream", "preprocess", "frame_encoder", "head", "intervention", "clip", "end_to_end",
          "end_to_end_workers", "stream_update", "long_video", "decode_per_sample", "stream_grid")  # fmt: skip
MODEL_STAGES = ("frame_encoder", "head", "intervention", "clip", "end_to_end", "end_to_end_workers", "stream_update", "stream_grid")
FLOP_STAGES = {"frame_encoder": "frame_encoder", "head": "head", "intervention": "intervention_op", "clip": "clip"}

# Bench videos: synthetic (FFmpeg's testsrc2 pattern), 720p H.264, generated once into the cache.
VIDEO_SIZE, VIDEO_RATE = (1280, 720), 30
BENCH_GOP_SECONDS = 2  # a common keyframe interval
LONG_GOP_SECONDS = 10  # sparse keyframes: seeking has to decode up to 300 frames per target
LONG_ITERS = 3  # a sequential pass over 10 minutes of 720p takes tens of seconds
STREAM_GRID_RATE, STREAM_GRID_SECONDS, STREAM_GRID_GOPS = 1.0, 60.0, (1, 2)  # stream_grid: grid frames per second, video length, GOPs (s)
STREAM_GRID_ITERS = 3  # stream_grid runs per decoding mode and GOP (each reads the whole video)
WORKER_FILES = 16  # videos per end_to_end_workers call (at least 4 per worker)
WORKER_ITERS = 3  # most end_to_end_workers calls per worker count (each decodes WORKER_FILES videos)


@dataclass(frozen=True)
class TorchVariant:
    """How a PyTorch backend runs: autocast precision, torch.compile mode, intervention implementation."""

    precision: str = "fp32"
    compile_mode: str | None = None  # "default", or "reduce-overhead" (CUDA graphs)
    impl: str = "torch"

    @property
    def needs_cuda(self) -> bool:
        return self.precision != "fp32" or self.impl == "triton" or self.compile_mode == "reduce-overhead"


TORCH_VARIANTS = {
    "torch": TorchVariant(),
    "torch-fp16": TorchVariant("fp16"),
    "torch-bf16": TorchVariant("bf16"),
    "torch-compile": TorchVariant(compile_mode="default"),
    "torch-fp16-triton": TorchVariant("fp16", impl="triton"),
    "torch-fp16-cudagraphs": TorchVariant("fp16", compile_mode="reduce-overhead"),
}
BACKENDS = (*TORCH_VARIANTS, "ort", "trt")
CPU_DEFAULT = ("torch", "ort")
GPU_DEFAULT = ("torch", "torch-fp16", "torch-bf16", "torch-compile", "torch-fp16-triton", "ort", "trt")


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


class TorchVariantBackend(TorchBackend):
    """The PyTorch backend run as a variant: under autocast, compiled, or with the Triton intervention."""

    def __init__(self, path, device: str, name: str, variant: TorchVariant):
        self.variant = variant
        super().__init__(path, device)
        self.name = name

    def load(self) -> None:
        super().load()
        import torch

        if self.variant.impl != "torch":
            self.model.set_intervention_impl(self.variant.impl)
        if self.variant.compile_mode:  # the model's forward calls these two
            self.model.frame_tokens = torch.compile(self.model.frame_tokens, mode=self.variant.compile_mode)
            self.model.head = torch.compile(self.model.head, mode=self.variant.compile_mode)

    def infer(self, part: str, feeds: dict) -> dict:
        import torch

        if self.variant.precision == "fp32":
            return super().infer(part, feeds)
        with torch.autocast(self.device, dtype=torch_dtype(self.variant.precision)):
            return super().infer(part, feeds)


class TimedBackend(Backend):
    """Runs another backend, adding up the seconds spent in its graphs (`seconds`)."""

    def __init__(self, inner: Backend):
        self.inner, self.info, self.path, self.device, self.seconds = inner, inner.info, inner.path, inner.device, 0.0

    def infer(self, part: str, feeds: dict) -> dict:
        started = time.perf_counter()
        try:
            return self.inner.infer(part, feeds)
        finally:
            self.seconds += time.perf_counter() - started


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class SkipStage(Exception):
    """A stage that cannot run here; the message says why."""


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
        info = cfg = video = None
        for label, load in self.plan_backends():
            backend = self.load_or_skip(label, load)
            if backend is None:
                continue
            if info is None:  # the first model sets F, the image size and the stream grid for the video stages
                info, cfg = backend.info, backend_config(backend)
                grid_rate = info.num_frames / info.window_seconds
                stride_frames = s.stride_frames or max(1, round(info.stride_seconds * grid_rate))
                self.stride_seconds = stride_frames / grid_rate
                if set(s.stages) & {"decode_video", "decode_stream", "preprocess", "end_to_end", "end_to_end_workers", "stream_update",
                                    "decode_per_sample"}:  # fmt: skip
                    video = self.bench_video(info, stride_frames)
                self.video_stages(info, video)
            stages = [stage for stage in MODEL_STAGES if stage in s.stages]
            if "intervention" in stages and not isinstance(backend, TorchBackend):
                stages.remove("intervention")
                self.skip(label, "intervention", "the op runs inside this backend's graph; it is timed alone through PyTorch only")
            for batch in s.batches:
                for stage in stages:
                    self.measure_model_stage(backend, label, stage, batch, video)
            del backend
            gc.collect()
            if self.cuda:
                import torch

                torch.cuda.empty_cache()  # the next backend's device memory starts from zero
        if info is None:
            raise BackendError("nothing to measure: no backend could run here (see the reasons above)")
        peaks = {key: max(value, peaks[key]) for key, value in measured_peaks(self.device, self.threads).items()}
        num_classes = len(info.classes)
        floors_by_batch = {b: floor_counts.model_floors(cfg, num_classes, b) for b in s.batches} if cfg else {}
        self.add_fractions(floors_by_batch, peaks)
        machine["load_average_end"] = load_average()
        return {
            "tool": "cmdcl-bench",
            "toolkit_version": __version__,
            "machine": machine,
            "measured_peaks": peaks,
            "settings": {**_plain(asdict(s)), "device": self.device, "threads": self.threads, "num_frames": info.num_frames,
                         "image_size": info.image_size, "num_classes": num_classes, "stride_frames": stride_frames,
                         "video": str(video) if video else None},  # fmt: skip
            "config": cfg.to_dict() if cfg else None,
            "floors": {str(b): f for b, f in floors_by_batch.items()},
            "records": [asdict(r) for r in self.records],
            "comparisons": comparisons(self.records),
            "skipped": self.skipped,
        }

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
            labels = [_engine_label(path, backend) for path in s.engines]
            labels = [f"{label}:{Path(path).name}" if labels.count(label) > 1 else label for label, path in zip(labels, s.engines)]
            return [(label, lambda p=path: self.load_engine(p, backend)) for label, path in zip(labels, s.engines)]
        names = list(s.backends or (GPU_DEFAULT if self.cuda else CPU_DEFAULT))
        if s.cuda_graphs and "torch-fp16-cudagraphs" not in names:
            names.append("torch-fp16-cudagraphs")
        plans = []
        for name in names:
            if name not in BACKENDS:
                raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
            if not self.gpu_only(name):
                plans.append((name, lambda n=name: self.load_generated(n)))
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

    def load_engine(self, path, backend: str) -> Backend:
        if backend in TORCH_VARIANTS and backend != "torch":  # a .pt checkpoint run as a PyTorch variant
            return TorchVariantBackend(path, self.device, backend, TORCH_VARIANTS[backend])
        loaded = load_backend(path, backend, self.device)
        if isinstance(loaded, OrtBackend):
            loaded.threads = self.threads  # sessions open on first use
        return loaded

    def load_generated(self, name: str) -> Backend:
        checkpoint = self.generated_model()
        if name in TORCH_VARIANTS:
            return TorchVariantBackend(checkpoint, self.device, name, TORCH_VARIANTS[name])
        onnx_path = self.generated_onnx()
        if name == "ort":
            return OrtBackend(onnx_path, self.device, threads=self.threads)
        from ..export.tensorrt_build import EngineBuildError, build_engine, split_pairs

        plan = self.work / "model.plan"
        if not plan.exists():
            self.log("cmdcl-bench: building TensorRT engines (fp16) from the exported ONNX")
            largest, frames = max(self.s.batches), self.generated_config().num_frames
            try:  # the frame encoder's batch axis counts frames: its profile reaches the largest batch's B*F
                for part_onnx, part_plan in split_pairs(onnx_path, plan):
                    per_clip = frames if part_onnx.name.endswith(".frame_encoder.onnx") else 1
                    build_engine(part_onnx, part_plan, precision="fp16", max_batch=largest * per_clip)
            except EngineBuildError as exc:
                raise BackendError(str(exc)) from None
        return load_backend(plan, "trt", self.device)

    def generated_model(self) -> Path:
        """A random-weight model of the preset, saved once as a checkpoint."""
        path = self.work / "model.pt"
        if not path.exists():
            import torch

            from ..model import CMDCL, save_checkpoint

            torch.manual_seed(0)
            save_checkpoint(CMDCL(self.generated_config(), [f"class {i}" for i in range(self.s.classes)]).eval(), path)
        return path

    def generated_config(self):
        from ..model import preset

        return preset(self.s.preset, **({"num_frames": self.s.frames} if self.s.frames else {}))

    def generated_onnx(self) -> Path:
        path = self.work / "model.onnx"
        if not path.exists():
            from ..export import export_onnx
            from ..model import load_checkpoint

            self.log(f"cmdcl-bench: exporting the {self.s.preset} model to ONNX (full graph + frame_encoder + head)")
            export_onnx(load_checkpoint(self.generated_model()), path)
        return path

    # ---- videos --------------------------------------------------------------------------------
    def bench_video(self, info, stride_frames: int) -> Path:
        """--video, or a generated 720p video long enough for the stream updates asked for."""
        if self.s.video:
            return Path(self.s.video)
        grid_rate = info.num_frames / info.window_seconds
        seconds = (info.num_frames + (self.s.warmup + self.s.iters + 1) * stride_frames) / grid_rate + 1
        return synthetic_video(seconds, BENCH_GOP_SECONDS, self.log)

    def video_stages(self, info, video: Path | None) -> None:
        f, size = info.num_frames, info.image_size
        s = self.s
        if "decode_video" in s.stages:
            clip = read_clip(video, f, size, sampling=s.sampling)
            self.measure("pyav", "decode_video", 1, lambda: read_clip(video, f, size, sampling=s.sampling), clips=1,
                         video_seconds=clip.duration, note=f"{f} frames ({s.sampling} sampling), {_video_label(video)}")  # fmt: skip
            self.records[-1].frames_per_sample = round(clip.frames_decoded / f, 3)
        if "decode_stream" in s.stages:
            grid_rate = f / info.window_seconds
            with PeakMemory() as memory:
                times = time_steps(iter_grid_frames(video, grid_rate, size), skip=s.warmup)
            self.add("pyav", "decode_stream", 1, times, memory, "frames/s", 1, 1 / grid_rate,
                     note=f"one grid frame at {grid_rate:g}/s, {_video_label(video)}")  # fmt: skip
        if "preprocess" in s.stages:
            decoded = first_frames(video, f)
            self.measure("pyav", "preprocess", 1, lambda: [frame_to_rgb(frame, size) for frame in decoded], clips=1,
                         note=f"{f} frames {decoded[0].width}x{decoded[0].height} -> {size}x{size} RGB")  # fmt: skip
        long_video = None
        if {"long_video", "decode_per_sample"} & set(s.stages):
            long_video = Path(s.long_video) if s.long_video else synthetic_video(s.long_minutes * 60, LONG_GOP_SECONDS, self.log)
        if "long_video" in s.stages:
            iters = min(s.iters, LONG_ITERS)
            for strategy in ("seek", "sequential"):
                clip = read_clip(long_video, f, size, strategy=strategy)  # also the warm-up (file cache)
                self.measure("pyav", f"long_video_{strategy}", 1, lambda st=strategy: read_clip(long_video, f, size, strategy=st),
                             clips=1, video_seconds=clip.duration, iters=iters, warmup=0,
                             note=f"{clip.frames_decoded} frames decoded for {f} ({clip.strategy}), {_video_label(long_video)}, "
                                  f"iters capped at {LONG_ITERS}")  # fmt: skip
        if "decode_per_sample" in s.stages:
            self.measure_sampling(video, f, size, "", s.iters)
            self.measure_sampling(long_video, f, size, "_long", min(s.iters, LONG_ITERS))

    def measure_sampling(self, video: Path, f: int, size: int, suffix: str, iters: int) -> None:
        """read_clip of `video` with each sampling, one after the other: decode time and frames decoded per sampled frame."""
        for sampling in SAMPLINGS:
            clip = read_clip(video, f, size, sampling=sampling)  # also the warm-up (file cache)
            self.measure("pyav", f"decode_per_sample_{sampling}{suffix}", 1, lambda sa=sampling: read_clip(video, f, size, sampling=sa),
                         clips=1, video_seconds=clip.duration, iters=iters, warmup=0,
                         note=f"{clip.frames_decoded} frames decoded for {f} ({clip.keyframes} keyframes), {_video_label(video)}")  # fmt: skip
            self.records[-1].frames_per_sample = round(clip.frames_decoded / f, 3)

    # ---- model stages -------------------------------------------------------------------------
    def measure_model_stage(self, backend: Backend, name: str, stage: str, batch: int, video: Path | None) -> None:
        info = backend.info
        f, size = info.num_frames, info.image_size
        rng = np.random.default_rng(batch)
        engine = str(backend.path) if self.s.engines else None
        try:
            if stage == "frame_encoder":
                frames = rng.integers(0, 256, (batch * f, size, size, 3), dtype=np.uint8)
                self.measure(name, stage, batch, lambda: backend.encode_frames(frames), clips=batch, engine=engine,
                             note=f"{batch * f} frames", cuda=self.cuda)  # fmt: skip
            elif stage == "head":
                tokens = rng.standard_normal((batch, f, info.tokens_per_frame, info.width), dtype=np.float32)
                self.measure(name, stage, batch, lambda: backend.classify_tokens(tokens), clips=batch, engine=engine, cuda=self.cuda)
            elif stage == "intervention":
                self.measure_intervention(backend, name, batch, engine)
            elif stage == "clip":
                frames = rng.integers(0, 256, (batch, f, size, size, 3), dtype=np.uint8)
                self.measure(name, stage, batch, lambda: backend.classify_clips(frames), clips=batch, engine=engine, cuda=self.cuda)
            elif stage == "end_to_end":
                recognizer = Recognizer(backend, batch=batch, sampling=self.s.sampling)
                duration = read_clip(video, f, size).duration
                self.measure(name, stage, batch, lambda: list(recognizer.predict_many([video] * batch)), clips=batch,
                             video_seconds=batch * duration, engine=engine,
                             note=f"decode ({self.s.sampling} sampling) + classify, {_video_label(video)}")  # fmt: skip
            elif stage == "end_to_end_workers":
                self.measure_workers(backend, name, batch, video, engine)
            elif stage == "stream_update":
                self.measure_stream(backend, name, batch, video, engine)
            elif stage == "stream_grid" and batch == self.s.batches[0]:  # one stream: the batch size does not apply
                self.measure_stream_grid(backend, name, engine)
        except SkipStage as exc:
            self.skip(name, stage, str(exc), batch)
        except (BackendError, RuntimeError, ValueError, ImportError) as exc:  # e.g. a GPU variant this stack cannot compile
            if self.debug:
                raise
            self.skip(name, stage, f"failed: {first_line(exc)}", batch)

    def measure_intervention(self, backend: Backend, name: str, batch: int, engine) -> None:
        """The fused op alone on the model's own memories, in the variant's precision and implementation."""
        import torch

        from ..kernels import causal_intervention

        model = backend.model
        variant = getattr(backend, "variant", TorchVariant())
        dtype = torch_dtype(variant.precision)
        with torch.inference_mode():
            memories = [m.to(dtype) for m in model.intervention_memories(model.text_features())]
        seq_len = model.cfg.num_frames * model.cfg.tokens_per_frame
        q = torch.randn(batch, seq_len, model.cfg.width, device=backend.device, dtype=dtype)
        op = causal_intervention
        if variant.compile_mode:
            op = torch.compile(causal_intervention, mode=variant.compile_mode)

        def run():
            with torch.inference_mode():
                op(q, *memories, num_heads=model.cfg.heads, impl=variant.impl)

        self.measure(name, "intervention", batch, run, clips=batch, engine=engine, cuda=self.cuda,
                     note=f"B={batch} L={seq_len} D={model.cfg.width} C={memories[0].shape[1]} Kz={memories[2].shape[1]}")  # fmt: skip

    def measure_workers(self, backend: Backend, name: str, batch: int, video: Path, engine) -> None:
        """Recognizer.predict_many over WORKER_FILES copies of the bench video (model batch `batch`), decoded in
        this process (1 worker: "end_to_end_serial") and by N worker processes ("end_to_end_parallel"), the two
        alternating so that both see the same machine. The parallel record's pipeline_efficiency is the larger of
        the decoding time / N (the serial runs' time outside the model) and the model time, over its end-to-end
        time: 1.0 when decoding and the model overlap perfectly. Host memory is this process's (not the workers')."""
        n = self.s.workers or usable_cores()
        timed = TimedBackend(backend)
        files = [video] * max(WORKER_FILES, 4 * n)
        counts = {"end_to_end_serial": 1, "end_to_end_parallel": n} if n > 1 else {"end_to_end_serial": 1}
        recognizers = {stage: Recognizer(timed, batch=batch, sampling=self.s.sampling, workers=w) for stage, w in counts.items()}
        wall, model, tops = {stage: [] for stage in counts}, {stage: [] for stage in counts}, {}
        with PeakMemory(self.cuda) as memory:
            for i in range(self.s.warmup + min(self.s.iters, WORKER_ITERS)):
                for stage, recognizer in recognizers.items():
                    started, before = time.perf_counter(), timed.seconds
                    records = list(recognizer.predict_many(files))
                    if i >= self.s.warmup:
                        wall[stage].append((time.perf_counter() - started) * 1e3)
                        model[stage].append((timed.seconds - before) * 1e3)
                    tops[stage] = [record.get("top", record.get("error")) for record in records]
        duration = read_clip(video, backend.info.num_frames, backend.info.image_size).duration
        identical = tops.get("end_to_end_parallel", tops["end_to_end_serial"]) == tops["end_to_end_serial"]
        for stage, workers in counts.items():
            note = (f"{len(files)} videos, {workers} decoding worker{'s' if workers > 1 else ''}, {self.s.sampling} sampling, "
                    f"{_video_label(video)}")  # fmt: skip
            if stage == "end_to_end_parallel":
                note += "; predictions identical to 1 worker" if identical else "; predictions DIFFER from 1 worker"
            self.add(name, stage, batch, wall[stage], memory, "clips/s", len(files), len(files) * duration, engine=engine, note=note)
        if n > 1:
            decoding = np.median(np.subtract(wall["end_to_end_serial"], model["end_to_end_serial"]))
            self.records[-1].pipeline_efficiency = round(max(decoding / n, np.median(model["end_to_end_parallel"]))
                                                         / np.median(wall["end_to_end_parallel"]), 3)  # fmt: skip
        else:
            self.skip(name, "end_to_end_parallel", "one usable CPU core: nothing to decode in parallel", batch)

    def measure_stream(self, backend: Backend, name: str, batch: int, video: Path, engine) -> None:
        """Recognizer.stream_many over `batch` copies of the video, per window update: the wall time
        ("stream_update": decoding the new grid frames, encoding them, the head) and the time spent in the
        backend ("stream_update_model": the model work the token cache leaves). The first window, which fills
        the ring buffer, and `warmup` updates are dropped."""
        timed = TimedBackend(backend)
        recognizer = Recognizer(timed, stride=self.stride_seconds)
        wall, model, windows = [], [], 0
        with PeakMemory(self.cuda) as memory:
            last_wall, last_model = time.perf_counter(), 0.0
            for record in recognizer.stream_many([video] * batch):
                windows += "window" in record
                if "window" not in record or windows % batch:  # wait until every stream produced this window
                    continue
                now = time.perf_counter()
                wall.append((now - last_wall) * 1e3)
                model.append((timed.seconds - last_model) * 1e3)
                last_wall, last_model = now, timed.seconds
        skip = 1 + self.s.warmup
        if len(wall) <= skip:
            raise SkipStage(f"{video} is too short for {skip + 1} windows at stride {self.stride_seconds:g} s")
        note = f"{recognizer.stride_frames} new frames per stream (stride {self.stride_seconds:g} s)"
        self.add(name, "stream_update", batch, wall[skip:], memory, "windows/s", batch, batch * self.stride_seconds,
                 engine=engine, note=note + ", incl. decoding")  # fmt: skip
        self.add(name, "stream_update_model", batch, model[skip:], memory, "windows/s", batch, batch * self.stride_seconds,
                 engine=engine, note=note + ", time inside the backend only")  # fmt: skip

    def measure_stream_grid(self, backend: Backend, name: str, engine) -> None:
        """Live streams per CPU core at a grid of STREAM_GRID_RATE frames per second: Recognizer.stream_many over
        STREAM_GRID_SECONDS of 720p H.264 for each GOP, decoding every frame ("stream_grid_all_gop...") and keyframes
        only where they are dense enough ("stream_grid_keyframes_gop..."), the two runs interleaved. A run's time is
        the process's CPU time (every thread: decoders, readers, the model), so throughput, seconds of video per CPU
        second, is the number of live streams one core keeps up with."""
        f, warmup = backend.info.num_frames, min(self.s.warmup, 1)
        window = f / STREAM_GRID_RATE
        for gop in STREAM_GRID_GOPS:
            video = synthetic_video(STREAM_GRID_SECONDS, gop, self.log)
            cpu_ms, keyframe_windows = {"all": [], "keyframes": []}, {}
            with PeakMemory(self.cuda) as memory:
                for run in range(warmup + min(self.s.iters, STREAM_GRID_ITERS)):
                    for decode in cpu_ms:
                        recognizer = Recognizer(backend, window=window, stride=window / 2, keyframe_grid=decode == "keyframes")
                        started = time.process_time()
                        windows = [r for r in recognizer.stream_many([video]) if "window" in r]
                        if run >= warmup:
                            cpu_ms[decode].append((time.process_time() - started) * 1e3)
                        keyframe_windows[decode] = f"{sum(w['decode'] == 'keyframes' for w in windows)} of {len(windows)}"
            for decode, times in cpu_ms.items():
                self.add(name, f"stream_grid_{decode}_gop{gop}s", 1, times, memory, "streams/core", STREAM_GRID_SECONDS,
                         STREAM_GRID_SECONDS, engine=engine,
                         note=f"p50_ms: CPU time (all threads) for {STREAM_GRID_SECONDS:g} s of {_video_label(video)}, GOP {gop} s, "
                              f"grid {STREAM_GRID_RATE:g}/s; windows from keyframes only: {keyframe_windows[decode]}")  # fmt: skip

    # ---- recording -----------------------------------------------------------------------------
    def measure(self, backend: str, stage: str, batch: int, fn, clips: int, video_seconds: float | None = None,
                engine=None, note: str = "", cuda: bool = False, iters: int | None = None, warmup: int | None = None) -> None:  # fmt: skip
        iters = iters or self.s.iters
        warmup = self.s.warmup if warmup is None else warmup
        if TORCH_VARIANTS.get(backend, TorchVariant()).compile_mode:
            warmup = max(warmup, 3)  # compilation, then CUDA graph recording, happen in the first calls
        with PeakMemory(cuda) as memory:
            times = time_calls(fn, iters, warmup, cuda)
        self.add(backend, stage, batch, times, memory, "clips/s", clips, video_seconds, engine, note)

    def add(self, backend, stage, batch, times, memory: PeakMemory, unit: str, per_call: float, video_seconds,
            engine=None, note: str = "") -> None:  # fmt: skip
        p = percentiles(times)
        seconds = p["p50_ms"] / 1e3
        if not memory.host_exact:
            note = (note + "; " if note else "") + "peak_mem_mb is the process's lifetime peak"
        self.records.append(Record(
            backend=backend, stage=stage, batch=batch, **p, throughput=round(per_call / seconds, 4), unit=unit,
            video_s_per_s=round(video_seconds / seconds, 3) if video_seconds else None, peak_mem_mb=memory.host_mb,
            device_mem_mb=memory.device_mb, iters=len(times), engine=engine, note=note,
        ))  # fmt: skip
        if self.progress:
            self.progress(f"{backend} {stage} batch {batch}: p50 {p['p50_ms']:.2f} ms")

    def skip(self, backend: str, stage: str, reason: str, batch: int | None = None) -> None:
        self.skipped.append({"backend": backend, "stage": stage, "batch": batch, "reason": reason})
        self.log(f"cmdcl-bench: skipped {backend} {stage}" + (f" batch {batch}" if batch else "") + f": {reason}")

    def add_fractions(self, floors_by_batch: dict, peaks: dict) -> None:
        """Achieved FLOP/s against the FLOP floor, as a fraction of the measured GEMM peak; for whole clips also
        the byte floor per second against the measured copy bandwidth."""
        for r in self.records:
            part = FLOP_STAGES.get(r.stage)
            if part is None or r.batch not in floors_by_batch:
                continue
            floor = floors_by_batch[r.batch]
            achieved = floor["flops"][part] * r.batch / (r.p50_ms / 1e3)
            precision = "fp16" if ("fp16" in r.backend or "bf16" in r.backend or r.backend == "trt") else "fp32"
            peak = peaks.get(f"gemm_{precision}_flops") or peaks["gemm_fp32_flops"]
            r.gflops_per_s = round(achieved / 1e9, 3)
            r.peak_flops_fraction = round(achieved / peak, 4)
            if r.stage == "clip":
                r.floor_bytes_fraction = round(floor["bytes_per_clip"] * r.batch / (r.p50_ms / 1e3) / peaks["copy_bytes_per_s"], 4)


def comparisons(records: list[Record]) -> list[dict]:
    """Ratios of p50 latencies (>1: the first named is faster):
    each backend vs PyTorch eager fp32 ("torch") on the same stage and batch; the stream update
    vs re-running the whole clip; seek-based vs sequential decoding of the long video; keyframe vs exact sampling."""
    by_key = {(r.backend, r.stage, r.batch): r for r in records}
    out = []
    for r in records:
        base = by_key.get(("torch", r.stage, r.batch))
        if base and r.backend not in ("torch", "pyav"):
            out.append({"comparison": f"{r.backend} vs torch", "stage": r.stage, "batch": r.batch,
                        "speedup": round(base.p50_ms / r.p50_ms, 3)})  # fmt: skip
    for r in records:
        clip = by_key.get((r.backend, "clip", r.batch))
        if r.stage == "stream_update_model" and clip:  # model work per window: cached tokens vs all F frames again
            out.append({"comparison": "stream update (token cache) vs whole clip", "backend": r.backend, "batch": r.batch,
                        "speedup": round(clip.p50_ms / r.p50_ms, 3)})  # fmt: skip
    for r in records:
        serial = by_key.get((r.backend, "end_to_end_serial", r.batch))
        if r.stage == "end_to_end_parallel" and serial:
            out.append({"comparison": "N decoding workers vs 1 (end to end)", "backend": r.backend, "batch": r.batch,
                        "speedup": round(serial.p50_ms / r.p50_ms, 3), "efficiency": r.pipeline_efficiency})  # fmt: skip
    seek, sequential = by_key.get(("pyav", "long_video_seek", 1)), by_key.get(("pyav", "long_video_sequential", 1))
    if seek and sequential:
        out.append({"comparison": "seek vs sequential (long video)", "stage": "long_video", "batch": 1,
                    "speedup": round(sequential.p50_ms / seek.p50_ms, 3)})  # fmt: skip
    for gop in STREAM_GRID_GOPS:
        for r in records:
            full = by_key.get((r.backend, f"stream_grid_all_gop{gop}s", 1))
            if r.stage == f"stream_grid_keyframes_gop{gop}s" and full:
                out.append({"comparison": f"keyframe grid vs full decoding (streams per core, GOP {gop} s)", "backend": r.backend,
                            "batch": 1, "speedup": round(full.p50_ms / r.p50_ms, 3)})  # fmt: skip
    for suffix, video in (("", "bench video"), ("_long", "long video")):
        exact, keyframe = (by_key.get(("pyav", f"decode_per_sample_{sampling}{suffix}", 1)) for sampling in ("exact", "keyframe"))
        if exact and keyframe:
            out.append({"comparison": f"keyframe vs exact sampling ({video})", "stage": "decode_per_sample", "batch": 1,
                        "speedup": round(exact.p50_ms / keyframe.p50_ms, 3)})  # fmt: skip
    return out


# ---- helpers -------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: PyTorch sees no CUDA GPU on this machine")
    return device


def backend_config(backend: Backend):
    """The CMDCLConfig a loaded backend runs (from the checkpoint, or the exported metadata's "config")."""
    from ..model.config import CMDCLConfig

    if isinstance(backend, TorchBackend):
        return backend.model.cfg
    config = getattr(backend, "meta", {}).get("config")
    return CMDCLConfig.from_dict(config) if config else None


def synthetic_video(seconds: float, gop_seconds: float, log) -> Path:
    """A 720p 30 fps H.264 test pattern (FFmpeg's testsrc2 through PyAV's lavfi input), keyframes every
    `gop_seconds`, cached under the cmdcl cache directory."""
    import av

    width, height = VIDEO_SIZE
    seconds = round(seconds, 1)
    path = cache_dir() / "bench" / f"testsrc2-{width}x{height}-{VIDEO_RATE}fps-gop{gop_seconds}s-{seconds:g}s-v2.mp4"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"cmdcl-bench: generating {path.name} (once; cached)")
    tmp = path.with_name(path.name + ".tmp.mp4")
    source = av.open(f"testsrc2=size={width}x{height}:rate={VIDEO_RATE}:duration={seconds:g}", format="lavfi")
    with source, av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=VIDEO_RATE, options={"preset": "ultrafast", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = int(gop_seconds * VIDEO_RATE)
        for frame in source.decode(video=0):
            frame = frame.reformat(format="yuv420p")
            frame.pict_type = av.video.frame.PictureType.NONE  # lavfi marks every frame I, which would force all-intra
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return path


def first_frames(video: Path, count: int) -> list:
    """The first `count` decoded frames (PyAV frames, native size), repeated if the video is shorter."""
    container, stream = open_video(video)
    with container:
        frames = []
        for frame in container.decode(stream):
            frames.append(frame)
            if len(frames) == count:
                break
    return [frames[i % len(frames)] for i in range(count)]


def _video_label(path: Path) -> str:
    container, stream = open_video(path)
    with container:
        return f"{Path(path).name} {stream.codec_context.width}x{stream.codec_context.height} {stream.codec_context.name}"


def _engine_label(path, backend: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".onnx": "ort", ".pt": "torch"}.get(suffix, "trt") if backend == "auto" else backend


def _plain(value):
    """Paths and tuples to JSON types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
