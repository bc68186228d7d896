"""The bench's stages, one function each, dispatched by name through VIDEO_STAGES and MODEL_STAGES.

Video stages run once, on the first model's clip shape (PyAV alone, no model):

    decode_video    read_clip: F frames over the whole bench video
    decode_stream   iter_grid_frames: one grid frame of stream mode
    preprocess      frame_to_rgb (colour conversion, resize, crop) of F decoded frames;
                    mean/std normalisation is inside the graphs (counted in frame_encoder)
    long_video      read_clip on a long video, seek-based vs one sequential pass
    decode_per_sample  read_clip with exact and with keyframe sampling, on the bench video and
                    the long one: time and frames decoded per sampled frame

Model stages run for each backend at each batch size B:

    frame_encoder   Backend.encode_frames on B*F frames
    head            Backend.classify_tokens on B windows of tokens
    intervention    cmdcl.kernels.causal_intervention alone (PyTorch backends only;
                    inside ONNX Runtime / TensorRT graphs it is not reachable alone)
    clip            Backend.classify_clips: the whole model on B clips of F frames
    end_to_end      Recognizer.predict_many: decode + classify B videos
    end_to_end_workers  Recognizer.predict_many over max(WORKER_FILES, 4 per worker) videos, decoded in the main
                    process ("end_to_end_serial") and by N worker processes ("end_to_end_parallel"),
                    with the pipeline's efficiency (see measure_workers)
    stream_update   Recognizer.stream_many over B streams: one window update (decoding
                    the new grid frames, encoding them once, one head call); also
                    stream_update_model, the part of it spent in the backend
    stream_scales   Recognizer.stream_many over one stream with 1, 2 and 3 window scales (W, 2W, 3W): time
                    per stride step, wall and inside the backend (each extra scale: one more window in the
                    step's head call, no more encoding)
    stream_grid     live streams per CPU core at a 1 fps grid: Recognizer.stream_many over
                    720p H.264 with a 1 s and a 2 s GOP, decoding every frame vs keyframes only

Each stage records through the Bench (`measure` times a call, `add` records times taken otherwise) and raises
SkipStage when it cannot run here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.video import SAMPLINGS, frame_to_rgb, iter_grid_frames, read_clip
from ..errors import CmdclError
from ..runtime.backends import Backend, ModelInfo
from ..runtime.decode_pool import default_workers
from ..runtime.recognizer import Recognizer
from . import videos
from .measure import PeakMemory, time_steps
from .report import pipeline_efficiency
from .variants import TimedBackend, intervention_call
from .videos import clip_duration, first_frames, video_label

if TYPE_CHECKING:
    from .runner import Bench

LONG_ITERS = 3  # a sequential pass over 10 minutes of 720p takes tens of seconds
STREAM_GRID_RATE, STREAM_GRID_SECONDS, STREAM_GRID_GOPS = 1.0, 60.0, (1, 2)  # stream_grid: grid frames per second, video length, GOPs (s)
STREAM_GRID_ITERS = 3  # stream_grid runs per decoding mode and GOP (each reads the whole video)
SCALE_ROUNDS = 3  # stream_scales: runs of each scale count, alternating (the timed steps are split among them)
WORKER_FILES = 16  # fewest videos per end_to_end_workers call (4 per worker when there are more workers)
WORKER_ITERS = 3  # most end_to_end_workers calls per worker count (each decodes max(WORKER_FILES, 4 per worker) videos)


class SkipStage(CmdclError):
    """A stage that cannot run here; the message says why."""


class VideoInputs:
    """What the video stages read: the first model's clip shape and stream grid (frames per second), and the bench
    video; the long video is made on first use."""

    def __init__(self, info: ModelInfo, grid_rate: float, video: Path | None, settings, log):
        self.info, self.grid_rate, self.video, self._settings, self._log = info, grid_rate, video, settings, log

    @cached_property
    def long_video(self) -> Path:
        return videos.long_video(self._settings, self._log)


@dataclass
class ModelTarget:
    """What a model stage measures: a loaded backend under its record label, at one batch size."""

    backend: Backend
    label: str
    batch: int
    video: Path | None  # the bench video (end to end and stream stages)
    engine: str | None  # the --engine file, recorded with the figures


# ---- video stages ------------------------------------------------------------------------------------
def measure_decode_video(bench: Bench, v: VideoInputs) -> None:
    f, size, sampling = v.info.num_frames, v.info.image_size, bench.s.sampling
    clip = read_clip(v.video, f, size, sampling=sampling)
    record = bench.measure("pyav", "decode_video", 1, lambda: read_clip(v.video, f, size, sampling=sampling), clips=1,
                           video_seconds=clip.duration, note=f"{f} frames ({sampling} sampling), {video_label(v.video)}")
    record.frames_per_sample = round(clip.frames_decoded / f, 3)


def measure_decode_stream(bench: Bench, v: VideoInputs) -> None:
    grid_rate = v.grid_rate
    with PeakMemory() as memory:
        times = time_steps(iter_grid_frames(v.video, grid_rate, v.info.image_size), skip=bench.s.warmup)
    bench.add("pyav", "decode_stream", 1, times, memory, "frames/s", 1, 1 / grid_rate,
              note=f"one grid frame at {grid_rate:g}/s, {video_label(v.video)}")


def measure_preprocess(bench: Bench, v: VideoInputs) -> None:
    f, size = v.info.num_frames, v.info.image_size
    decoded = first_frames(v.video, f)
    bench.measure("pyav", "preprocess", 1, lambda: [frame_to_rgb(frame, size) for frame in decoded], clips=1,
                  note=f"{f} frames {decoded[0].width}x{decoded[0].height} -> {size}x{size} RGB")


def measure_long_video(bench: Bench, v: VideoInputs) -> None:
    """read_clip of the long video seeking to each sample and in one sequential pass."""
    f, size, long_video = v.info.num_frames, v.info.image_size, v.long_video
    for strategy in ("seek", "sequential"):
        clip = read_clip(long_video, f, size, strategy=strategy)  # also the warm-up (file cache)
        bench.measure("pyav", f"long_video_{strategy}", 1, lambda st=strategy: read_clip(long_video, f, size, strategy=st),
                      clips=1, video_seconds=clip.duration, iters=min(bench.s.iters, LONG_ITERS), warmup=0,
                      note=f"{clip.frames_decoded} frames decoded for {f} ({clip.strategy}), {video_label(long_video)}, "
                           f"iters capped at {LONG_ITERS}")


def measure_decode_per_sample(bench: Bench, v: VideoInputs) -> None:
    measure_sampling(bench, v.video, v.info, "", bench.s.iters)
    measure_sampling(bench, v.long_video, v.info, "_long", min(bench.s.iters, LONG_ITERS))


def measure_sampling(bench: Bench, video: Path, info: ModelInfo, suffix: str, iters: int) -> None:
    """read_clip of `video` with each sampling, one after the other: decode time and frames decoded per sampled frame."""
    f, size = info.num_frames, info.image_size
    for sampling in SAMPLINGS:
        clip = read_clip(video, f, size, sampling=sampling)  # also the warm-up (file cache)
        note = f"{clip.frames_decoded} frames decoded for {f} ({clip.keyframes} keyframes), {video_label(video)}"
        record = bench.measure("pyav", f"decode_per_sample_{sampling}{suffix}", 1,
                               lambda sa=sampling: read_clip(video, f, size, sampling=sa),
                               clips=1, video_seconds=clip.duration, iters=iters, warmup=0, note=note)
        record.frames_per_sample = round(clip.frames_decoded / f, 3)


# ---- model stages ------------------------------------------------------------------------------------
def measure_frame_encoder(bench: Bench, t: ModelTarget) -> None:
    f, size = t.backend.info.num_frames, t.backend.info.image_size
    frames = np.random.default_rng(t.batch).integers(0, 256, (t.batch * f, size, size, 3), dtype=np.uint8)
    bench.measure(t.label, "frame_encoder", t.batch, lambda: t.backend.encode_frames(frames), clips=t.batch, engine=t.engine,
                  note=f"{t.batch * f} frames", cuda=bench.cuda)


def measure_head(bench: Bench, t: ModelTarget) -> None:
    info = t.backend.info
    tokens = np.random.default_rng(t.batch).standard_normal((t.batch, info.num_frames, info.tokens_per_frame, info.width), dtype=np.float32)
    bench.measure(t.label, "head", t.batch, lambda: t.backend.classify_tokens(tokens), clips=t.batch, engine=t.engine, cuda=bench.cuda)


def measure_intervention(bench: Bench, t: ModelTarget) -> None:
    """The fused op alone on the model's own memories, in the variant's precision and implementation."""
    run, note = intervention_call(t.backend, t.batch)
    bench.measure(t.label, "intervention", t.batch, run, clips=t.batch, engine=t.engine, cuda=bench.cuda, note=note)


def measure_clip(bench: Bench, t: ModelTarget) -> None:
    f, size = t.backend.info.num_frames, t.backend.info.image_size
    frames = np.random.default_rng(t.batch).integers(0, 256, (t.batch, f, size, size, 3), dtype=np.uint8)
    bench.measure(t.label, "clip", t.batch, lambda: t.backend.classify_clips(frames), clips=t.batch, engine=t.engine, cuda=bench.cuda)


def measure_end_to_end(bench: Bench, t: ModelTarget) -> None:
    recognizer = Recognizer(t.backend, batch=t.batch, sampling=bench.s.sampling)
    duration = clip_duration(t.video, t.backend.info.num_frames, t.backend.info.image_size)
    bench.measure(t.label, "end_to_end", t.batch, lambda: list(recognizer.predict_many([t.video] * t.batch)), clips=t.batch,
                  video_seconds=t.batch * duration, engine=t.engine,
                  note=f"decode ({bench.s.sampling} sampling) + classify, {video_label(t.video)}")


def measure_workers(bench: Bench, t: ModelTarget) -> None:
    """Recognizer.predict_many over max(WORKER_FILES, 4 per worker) copies of the bench video (model batch B), decoded in
    this process (1 worker: "end_to_end_serial") and by N worker processes ("end_to_end_parallel"), the two
    alternating so that both see the same machine. The parallel record carries the pipeline's efficiency
    (report.pipeline_efficiency). Host memory is this process's (not the workers')."""
    s = bench.s
    n = s.workers or default_workers()
    timed = TimedBackend(t.backend)
    files = [t.video] * max(WORKER_FILES, 4 * n)
    counts = {"end_to_end_serial": 1, "end_to_end_parallel": n} if n > 1 else {"end_to_end_serial": 1}
    recognizers = {stage: Recognizer(timed, batch=t.batch, sampling=s.sampling, workers=w) for stage, w in counts.items()}
    wall, model, tops = {stage: [] for stage in counts}, {stage: [] for stage in counts}, {}
    with PeakMemory(bench.cuda) as memory:
        for i in range(s.warmup + min(s.iters, WORKER_ITERS)):
            for stage, recognizer in recognizers.items():
                started, before = time.perf_counter(), timed.seconds
                records = list(recognizer.predict_many(files))
                if i >= s.warmup:
                    wall[stage].append((time.perf_counter() - started) * 1e3)
                    model[stage].append((timed.seconds - before) * 1e3)
                tops[stage] = [record.get("top", record.get("error")) for record in records]
    duration = clip_duration(t.video, t.backend.info.num_frames, t.backend.info.image_size)
    identical = tops.get("end_to_end_parallel", tops["end_to_end_serial"]) == tops["end_to_end_serial"]
    added = {}
    for stage, workers in counts.items():
        note = (f"{len(files)} videos, {workers} decoding worker{'s' if workers > 1 else ''}, {s.sampling} sampling, "
                f"{video_label(t.video)}")
        if stage == "end_to_end_parallel":
            note += "; predictions identical to 1 worker" if identical else "; predictions DIFFER from 1 worker"
        added[stage] = bench.add(t.label, stage, t.batch, wall[stage], memory, "clips/s", len(files), len(files) * duration,
                                 engine=t.engine, note=note)
    if n > 1:
        added["end_to_end_parallel"].pipeline_efficiency = pipeline_efficiency(
            wall["end_to_end_serial"], model["end_to_end_serial"], wall["end_to_end_parallel"], model["end_to_end_parallel"], n)
    else:
        bench.skip(t.label, "end_to_end_parallel", "one usable CPU core: nothing to decode in parallel", t.batch)


def measure_stream(bench: Bench, t: ModelTarget) -> None:
    """Recognizer.stream_many over B copies of the video, per window update: the wall time
    ("stream_update": decoding the new grid frames, encoding them, the head) and the time spent in the
    backend ("stream_update_model": the model work the token cache leaves). The first window, which fills
    the ring buffer, and `warmup` updates are dropped."""
    recognizer = Recognizer(TimedBackend(t.backend), stride=bench.stride_seconds)
    with PeakMemory(bench.cuda) as memory:
        steps = stride_steps(recognizer, [t.video] * t.batch)
    wall, model = [w for w, _ in steps], [m for _, m in steps]
    skip = 1 + bench.s.warmup
    if len(wall) <= skip:
        raise SkipStage(f"{t.video} is too short for {skip + 1} windows at stride {bench.stride_seconds:g} s")
    note = f"{recognizer.stride_frames} new frames per stream (stride {bench.stride_seconds:g} s)"
    video_seconds = t.batch * bench.stride_seconds
    bench.add(t.label, "stream_update", t.batch, wall[skip:], memory, "windows/s", t.batch, video_seconds,
              engine=t.engine, note=note + ", incl. decoding")
    bench.add(t.label, "stream_update_model", t.batch, model[skip:], memory, "windows/s", t.batch, video_seconds,
              engine=t.engine, note=note + ", time inside the backend only")


def measure_stream_scales(bench: Bench, t: ModelTarget) -> None:
    """The cost of each extra window scale: Recognizer.stream_many over B streams of one video with the model's window W
    alone, then with 2W, then with 2W and 3W too ("stream_scales_<n>": wall time per stride step, decoding included;
    "stream_scales_<n>_model": the time inside the backend). Each run times the same steps: those after the 3W windows
    have started (and `warmup` more); the three alternate for up to SCALE_ROUNDS rounds, so that all see the same machine.
    The video: --video, else a generated one just long enough."""
    info, stride = t.backend.info, bench.stride_seconds
    windows = tuple(n * info.window_seconds for n in (1, 2, 3))
    runs = {n: Recognizer(TimedBackend(t.backend), window=windows[:n], stride=stride) for n in (1, 2, 3)}
    step_frames, spans = runs[3].stride_frames, runs[3].spans
    skip = -(-(spans[-1] - spans[0]) // step_frames) + 1 + bench.s.warmup  # steps until every 3W window is due, warm-up
    rounds = min(SCALE_ROUNDS, bench.s.iters)
    per_run = -(-bench.s.iters // rounds)
    seconds = (spans[0] + (skip + per_run + 1) * step_frames) / runs[3].grid_rate + 1
    video = videos.bench_video(bench.s, seconds, bench.log)
    wall, model = {n: [] for n in runs}, {n: [] for n in runs}
    with PeakMemory(bench.cuda) as memory:
        for _ in range(rounds):
            for n, recognizer in runs.items():
                steps = stride_steps(recognizer, [video] * t.batch)
                if len(steps) < skip + per_run:
                    raise SkipStage(f"{video} is too short for {skip + per_run} stride steps of {stride:g} s "
                                    f"with a {windows[-1]:g} s window")
                wall[n] += [w for w, _ in steps[skip : skip + per_run]]
                model[n] += [m for _, m in steps[skip : skip + per_run]]
    for n in runs:
        note = (f"{t.batch} stream(s), windows {', '.join(f'{w:g}' for w in windows[:n])} s, {step_frames} new frames per step; "
                f"{n * t.batch} windows per head call")
        bench.add(t.label, f"stream_scales_{n}", t.batch, wall[n], memory, "steps/s", 1, t.batch * stride, engine=t.engine,
                  note=note + ", incl. decoding")
        bench.add(t.label, f"stream_scales_{n}_model", t.batch, model[n], memory, "steps/s", 1, t.batch * stride,
                  engine=t.engine, note=note + ", time inside the backend only")


def stride_steps(recognizer: Recognizer, sources: list) -> list[tuple[float, float]]:
    """(wall ms, ms inside the backend) of each stride step of `recognizer.stream_many(sources)` (the recognizer's backend
    a TimedBackend): a step ends when every source has had its shortest-scale window (the longer scales' windows share
    that step's head call)."""
    timed, steps, windows = recognizer.backend, [], 0
    last_wall, last_model = time.perf_counter(), timed.seconds
    for record in recognizer.stream_many(sources):
        if record.get("summary") or record["scale"] != recognizer.window:
            continue
        windows += 1
        if windows % len(sources) == 0:
            now = time.perf_counter()
            steps.append(((now - last_wall) * 1e3, (timed.seconds - last_model) * 1e3))
            last_wall, last_model = now, timed.seconds
    return steps


def measure_stream_grid(bench: Bench, t: ModelTarget) -> None:
    """Live streams per CPU core at a grid of STREAM_GRID_RATE frames per second: Recognizer.stream_many over
    STREAM_GRID_SECONDS of 720p H.264 for each GOP, decoding every frame ("stream_grid_all_gop...") and keyframes
    only where they are dense enough ("stream_grid_keyframes_gop..."), the two runs interleaved. A run's time is
    the process's CPU time (every thread: decoders, readers, the model), so throughput, seconds of video per CPU
    second, is the number of live streams one core keeps up with. One stream: measured at the first batch size only."""
    if t.batch != bench.s.batches[0]:
        return
    f, warmup = t.backend.info.num_frames, min(bench.s.warmup, 1)
    window = f / STREAM_GRID_RATE
    for gop in STREAM_GRID_GOPS:
        video = videos.synthetic_video(STREAM_GRID_SECONDS, gop, bench.log)
        cpu_ms, keyframe_windows = {"all": [], "keyframes": []}, {}
        with PeakMemory(bench.cuda) as memory:
            for run in range(warmup + min(bench.s.iters, STREAM_GRID_ITERS)):
                for decode in cpu_ms:
                    recognizer = Recognizer(t.backend, window=window, stride=window / 2, keyframe_grid=decode == "keyframes")
                    started = time.process_time()
                    windows = [r for r in recognizer.stream_many([video]) if "window" in r]
                    if run >= warmup:
                        cpu_ms[decode].append((time.process_time() - started) * 1e3)
                    keyframe_windows[decode] = f"{sum(w['decode'] == 'keyframes' for w in windows)} of {len(windows)}"
        for decode, times in cpu_ms.items():
            bench.add(t.label, f"stream_grid_{decode}_gop{gop}s", 1, times, memory, "streams/core", STREAM_GRID_SECONDS,
                      STREAM_GRID_SECONDS, engine=t.engine,
                      note=f"p50_ms: CPU time (all threads) for {STREAM_GRID_SECONDS:g} s of {video_label(video)}, GOP {gop} s, "
                           f"grid {STREAM_GRID_RATE:g}/s; windows from keyframes only: {keyframe_windows[decode]}")


# Run in this order (a run's records follow it), the video stages once, the model stages per backend and batch size.
VIDEO_STAGES = {
    "decode_video": measure_decode_video,
    "decode_stream": measure_decode_stream,
    "preprocess": measure_preprocess,
    "long_video": measure_long_video,
    "decode_per_sample": measure_decode_per_sample,
}
MODEL_STAGES = {
    "frame_encoder": measure_frame_encoder,
    "head": measure_head,
    "intervention": measure_intervention,
    "clip": measure_clip,
    "end_to_end": measure_end_to_end,
    "end_to_end_workers": measure_workers,
    "stream_update": measure_stream,
    "stream_scales": measure_stream_scales,
    "stream_grid": measure_stream_grid,
}
# The stages --stages offers, in the order --help lists them.
STAGES = ("decode_video", "decode_stream", "preprocess", "frame_encoder", "head", "intervention", "clip", "end_to_end",
          "end_to_end_workers", "stream_update", "stream_scales", "long_video", "decode_per_sample", "stream_grid")
# The stages that read the bench video (it is generated only when one of them runs).
BENCH_VIDEO_STAGES = {"decode_video", "decode_stream", "preprocess", "decode_per_sample", "end_to_end", "end_to_end_workers",
                      "stream_update"}
