"""Full CMDCL against its three ablations on the synthetic benchmark (README "Results").

    python benchmarks/train_ablations.py --work /tmp/cmdcl-bench --seeds 0 1 --epochs 30

Generates the train/test/ood splits with `cmdcl-synth`'s generator (skipped
when present), trains every (ablation, seed) with the same budget through
`cmdcl.train.loop.train`, evaluates on test and ood, and writes
`results-<target>.json` and a markdown table (`results-<target>.md`) into
--work; `--target segments` measures atomic-action mAP instead of activity top-1. Every number
comes from this run; the machine is recorded in the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from cmdcl.data.datasets import load_dataset
from cmdcl.data.synth import generate
from cmdcl.train.loop import ABLATIONS, TrainOptions, evaluate, train


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-videos", type=int, default=280)
    parser.add_argument("--eval-videos", type=int, default=140)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--text-init", default="auto")
    parser.add_argument("--target", default="label", choices=["label", "segments"], help="segments: atomic actions, multi-label, mAP")
    args = parser.parse_args()

    work = args.work
    splits = {"train": args.train_videos, "test": args.eval_videos, "ood": args.eval_videos}
    for split, videos in splits.items():
        if not (work / split / "manifest.csv").is_file():
            generate(work / split, videos, args.data_seed, split, progress=True)
    metric = "mAP" if args.target == "segments" else "top1"
    results = []
    for seed in args.seeds:
        for ablation in args.ablations:
            out = work / "models" / f"{args.target}-{ablation}-seed{seed}.pt"
            out.parent.mkdir(parents=True, exist_ok=True)
            opts = TrainOptions(
                data=str(work / "train" / "manifest.csv"), out=str(out), epochs=args.epochs, batch_size=args.batch_size,
                seed=seed, ablation=ablation, text_init=args.text_init, cache_dir=str(work / "cache"), target=args.target,
            )
            start = time.perf_counter()
            model = train(opts, command=f"benchmarks/train_ablations.py ({ablation}, seed {seed})")
            seconds = time.perf_counter() - start
            row = {"ablation": ablation, "seed": seed, "train_seconds": round(seconds, 1),
                   "final_train_loss": model.checkpoint_extra["history"][-1]["loss"]}
            for split in ("test", "ood"):
                data = load_dataset(work / split / "manifest.csv", classes=model.class_names, target=args.target)
                report = evaluate(model, data, cache_dir=str(work / "cache"))
                row[f"{split}_{metric}"] = report[metric]
            print(json.dumps(row), flush=True)
            results.append(row)

    machine = f"{cpu_name()}, {__import__('os').cpu_count()} cores, CPU only"
    summary = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "runs": results}
    (work / f"results-{args.target}.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Synthetic benchmark, target {args.target} ({'atomic actions, mAP' if metric == 'mAP' else 'activities, top-1'}), tiny preset, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.train_videos} training videos, "
        f"{args.eval_videos} per eval split, seeds {' '.join(map(str, args.seeds))}; machine: {machine}.",
        "",
        f"| model | test {metric} % (per seed) | test mean | ood {metric} % (per seed) | ood mean | train s / run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ablation in args.ablations:
        rows = [r for r in results if r["ablation"] == ablation]
        test = [100 * r[f"test_{metric}"] for r in rows]
        ood = [100 * r[f"ood_{metric}"] for r in rows]
        name = "full CMDCL" if ablation == "none" else ablation
        lines.append(
            f"| {name} | {' / '.join(f'{v:.1f}' for v in test)} | {statistics.mean(test):.1f} | "
            f"{' / '.join(f'{v:.1f}' for v in ood)} | {statistics.mean(ood):.1f} | "
            f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
        )
    (work / f"results-{args.target}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
