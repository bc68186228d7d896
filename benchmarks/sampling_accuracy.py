"""Keyframe vs exact sampling, and FFmpeg decoder options, on the synthetic benchmark (issue 12).

    python benchmarks/sampling_accuracy.py --work /tmp/cmdcl-sampling --json sampling.json

Generates the `test` and `ood` splits with cmdcl-synth's generator (140 videos each, seed 0, as in README
"Synthetic benchmark"; skipped when present), decodes every video with each variant and classifies the clips
with the bundled demo model (cmdcl/assets/cmdcl_tiny_synth.pt, trained on that benchmark's `train` split).
Variants: `exact` (read_clip's default, as in training), `keyframe` (sampling="keyframe"), and exact sampling
through the decoder options of --decoders. Per split and variant it prints top-1, how often the variant's
top-1 agrees with exact sampling's, frames decoded per sampled frame and decode seconds.

Decoder options are applied by wrapping cmdcl.data.video.open_video (where read_clip opens every stream), so
this measures them before the toolkit adopts any. Their speed on the synthetic 96 px videos says little, so
--speed-video times exact read_clip on given videos (e.g. the 720p bench videos) with each decoder variant,
interleaved, median of --repeats after one warm-up round. Every figure comes from this run; the machine and
its load are printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cmdcl.assets import demo_checkpoint
from cmdcl.data import video
from cmdcl.data.datasets import load_dataset
from cmdcl.data.synth import generate
from cmdcl.model import load_checkpoint
from cmdcl.train.loop import predict

DECODERS = {  # name: (codec options, thread_type, thread_count); None keeps open_video's setting
    "skip_loop_filter": ({"skip_loop_filter": "all"}, None, None),
    "fast": ({"flags2": "+fast"}, None, None),
    "skip_loop_filter+fast": ({"skip_loop_filter": "all", "flags2": "+fast"}, None, None),
    "slice_threads": ({}, "SLICE", None),
    "frame_threads": ({}, "FRAME", None),
    "one_thread": ({}, "FRAME", 1),
}


@contextmanager
def decoder(name: str | None):
    """read_clip with the decoder settings DECODERS[name] (None: the toolkit's own)."""
    if name is None:
        yield
        return
    options, thread_type, thread_count = DECODERS[name]
    original = video.open_video

    def open_with(source, timeout=video.DEFAULT_TIMEOUT):
        container, stream = original(source, timeout)
        stream.codec_context.options = dict(options)
        if thread_type:
            stream.thread_type = thread_type
        if thread_count:
            stream.codec_context.thread_count = thread_count
        return container, stream

    video.open_video = open_with
    try:
        yield
    finally:
        video.open_video = original


def decode_split(dataset, frames: int, size: int, sampling: str, decoder_name: str | None) -> dict:
    clips, decoded, keyframes = [], 0, 0
    started = time.perf_counter()
    with decoder(decoder_name):
        for entry in dataset.entries:
            clip = video.read_clip(entry.path, frames, size, sampling=sampling)
            clips.append(torch.from_numpy(clip.frames))
            decoded += clip.frames_decoded
            keyframes += clip.keyframes
    seconds = time.perf_counter() - started
    samples = frames * len(dataset.entries)
    return {"clips": torch.stack(clips), "frames_per_sample": decoded / samples, "keyframe_share": keyframes / samples,
            "decode_s": seconds}


def accuracy_study(work: Path, decoders: list, batch_size: int) -> dict:
    model = load_checkpoint(demo_checkpoint())
    frames, size = model.cfg.num_frames, model.cfg.vision.image_size
    results = {}
    for split in ("test", "ood"):
        if not (work / split / "manifest.csv").is_file():
            generate(work / split, 140, 0, split, progress=True)
        dataset = load_dataset(work / split / "manifest.csv", classes=model.class_names)
        targets = dataset.targets(False)
        variants = [("exact", "exact", None), ("keyframe", "keyframe", None), *((name, "exact", name) for name in decoders)]
        top1 = {}
        for label, sampling, decoder_name in variants:
            decoded = decode_split(dataset, frames, size, sampling, decoder_name)
            top1[label] = predict(model, decoded.pop("clips"), batch_size).argmax(1)
            results.setdefault(split, {})[label] = {
                "top1": round(float((top1[label] == targets).float().mean()) * 100, 2),
                "agreement_with_exact": round(float((top1[label] == top1["exact"]).float().mean()) * 100, 2),
                **{k: round(v, 3) for k, v in decoded.items()},
            }
            print(f"{split:5s} {label:22s} " + "  ".join(f"{k} {v}" for k, v in results[split][label].items()), flush=True)
        results[split]["videos"] = len(dataset.entries)
    return results


def speed_study(videos: list, decoders: list, frames: int, size: int, repeats: int) -> dict:
    """Exact read_clip per decoder variant, interleaved: median wall and CPU seconds (all threads; steadier than wall
    time on a shared machine) and the CPU-time ratio to the toolkit's decoder."""
    results = {}
    for path in videos:
        names = [None, *decoders]
        wall, cpu = {name: [] for name in names}, {name: [] for name in names}
        for round_ in range(repeats + 1):
            for name in names:
                with decoder(name):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    clip = video.read_clip(path, frames, size)
                    if round_:  # the first round warms the file cache
                        wall[name].append(time.perf_counter() - started)
                        cpu[name].append(time.process_time() - started_cpu)
        base = statistics.median(cpu[None])
        results[str(path)] = {name or "default": {"median_s": round(statistics.median(wall[name]), 4),
                                                  "median_cpu_s": round(statistics.median(cpu[name]), 4),
                                                  "cpu_speedup": round(base / statistics.median(cpu[name]), 3),
                                                  "frames_decoded": clip.frames_decoded}
                              for name in names}
        for name, row in results[str(path)].items():
            print(f"speed {Path(path).name} {name:22s} {row}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="Holds the synthetic test/ood splits (made when missing).")
    parser.add_argument("--decoders", nargs="*", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--speed-video", type=Path, action="append", default=[], help="Time exact read_clip on this video per decoder.")
    parser.add_argument("--speed-frames", type=int, default=64, help="F for --speed-video.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-accuracy", action="store_true", help="Only the --speed-video timings.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report = {"load_average_start": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    print(f"load average {report['load_average_start']}", flush=True)
    if not args.no_accuracy:
        report["accuracy"] = accuracy_study(args.work, args.decoders, args.batch_size)
    if args.speed_video:
        report["speed"] = speed_study(args.speed_video, args.decoders, args.speed_frames, 96, args.repeats)
    report["load_average_end"] = os.getloadavg()
    print(f"load average {report['load_average_end']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
