"""Stream accuracy against window length on the synthetic benchmark (issue 15).

    python benchmarks/stream_windows.py --work /tmp/cmdcl-stream-windows [--split test|ood] [--videos 140]

Generates cmdcl-synth's `test` split (or `ood`: 140 videos, seed 0, as in README "Synthetic benchmark"; skipped
when present) and streams it through the bundled demo model (cmdcl/assets/cmdcl_tiny_synth.pt, exported to ONNX,
ONNX Runtime CPU) with windows of a fraction of the training clip span D (the median duration of the training
videos, so that a window of D gives F frames over what a training clip spanned): 1/8, 1/4, 1/2 and 1 of D,
each with a stride of half its window. D is the model's recorded `clip_seconds` when it records one, else what
cmdcl-train records (cmdcl.train.loop.training_sampling) over the regenerated `train` split (280 videos, seed 0).
Both modes sample exactly (as in training and cmdcl-eval). Per window: window top-1, summary top-1, agreement
with video mode (cmdcl.train.stream_eval), the windows classified and the wall seconds of the stream pass; one
JSON line each, appended to --jsonl with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cmdcl.bench.measure import cpu_model
from cmdcl.data.datasets import load_dataset
from cmdcl.data.synth import generate
from cmdcl.runtime import Recognizer, load_backend
from cmdcl.train.loop import training_sampling
from cmdcl.train.stream_eval import StreamConfig, evaluate_stream

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def split(work: Path, name: str, videos: int) -> Path:
    """cmdcl-synth's split `name` (seed 0) under `work`, generated once."""
    manifest = work / name / "manifest.csv"
    return manifest if manifest.is_file() else generate(work / name, videos, seed=0, split=name, progress=True)


def clip_seconds(backend, work: Path) -> tuple[float, str]:
    """(D, where it comes from)."""
    if "clip_seconds" in backend.info.sampling:
        return float(backend.info.sampling["clip_seconds"]), "recorded in the model"
    train = load_dataset(split(work, "train", 280), "train", backend.info.classes)
    sampling = training_sampling(train, backend.info.num_frames, lambda line: print(line, file=sys.stderr))
    return float(sampling["clip_seconds"]), f"{sampling['source']} (cmdcl-synth train, seed 0; the model records none)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmdcl-stream-windows"), help="Where the splits are generated.")
    parser.add_argument("--split", default="test", choices=["test", "ood"], help="ood: backgrounds independent of the activity.")
    parser.add_argument("--videos", type=int, default=140, help="The first N videos of the split.")
    parser.add_argument("--jsonl", type=Path, default=Path(__file__).parent / "results" / "stream-windows.jsonl")
    args = parser.parse_args()
    backend = load_backend(None, "ort", "cpu")
    test = load_dataset(split(args.work, args.split, 140), args.split, backend.info.classes)
    test.entries = test.entries[: args.videos]
    d, source = clip_seconds(backend, args.work)
    classes = len(backend.info.classes)
    timings = {}

    def recognizer(window, stride):
        made = Recognizer(backend, top_k=classes, threshold=0.0, window=window, stride=stride, sampling="exact", keyframe_grid=False)
        timings[(window, stride)] = time.perf_counter()
        return made

    configs = [StreamConfig(d * f, d * f / 2) for f in FRACTIONS]
    started = time.perf_counter()
    report = evaluate_stream(recognizer, test, configs)
    # a configuration's recognizer is made just before its stream pass: the time to the next one's (or the end) is that pass
    marks = [timings[(c.window, c.stride)] for c in configs] + [time.perf_counter()]
    machine = f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end (seconds are indicative)"
    common = {"study": "stream-windows", "model": "cmdcl_tiny_synth.pt (ONNX Runtime CPU)", "split": f"synth {args.split}, seed 0",
              "videos": report["videos"], "skipped": len(report["skipped"]), "clip_seconds": round(d, 3), "clip_seconds_source": source,
              "video_top1": report["video_top1"], "machine": machine, "command": " ".join(["python", *sys.argv])}
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    print(f"D = {d:.3f} s ({source}); {report['videos']} videos; video mode top-1 {100 * report['video_top1']:.2f}%; "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| window | seconds | stride s | windows | window top-1 | summary top-1 | agreement with video mode | stream pass s |")
    print("|---|---|---|---|---|---|---|---|")
    with open(args.jsonl, "a") as f:
        for fraction, figures, begin, end in zip(FRACTIONS, report["configs"], marks, marks[1:]):
            row = {**common, "fraction": fraction, **figures, "stream_seconds": round(end - begin, 2)}
            f.write(json.dumps(row) + "\n")
            print(f"| D x {fraction:g} | {figures['window']:.3f} | {figures['stride']:.3f} | {figures['windows']} | "
                  f"{100 * figures['window_top1']:.2f}% | {100 * figures['summary_top1']:.2f}% | {100 * figures['agreement']:.2f}% | "
                  f"{end - begin:.1f} |")


if __name__ == "__main__":
    main()
