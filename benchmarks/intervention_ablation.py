"""Full CMDCL against its ablations, with enough seeds to tell them apart (issue 16), on the synthetic benchmark.

    OMP_NUM_THREADS=1 python benchmarks/intervention_ablation.py --work W --towers random mini-vlm --clip-weights V.pt --jobs 2
    python benchmarks/intervention_ablation.py --report-only --markdown ablation.md

Data (generated into --work when absent): cmdcl-synth's train/test/ood splits with --data-seed, and `val`, drawn
like `test` (backgrounds confounded) but with its own --val-seed, so its videos are not test's.
Stage `select`: for each frozen tower (`random`, the tiny preset's seeded initial tower; `mini-vlm`, the CLIP
weights of --clip-weights), full CMDCL with each candidate setting (CMDCLConfig overrides, TrainOptions.model_options)
on --select-seeds, scored on `val` only; the best mean wins, ties go to the setting with fewer overrides.
Stage `ablate`: each tower's selected setting (or --setting), ablations none / no-textual / no-visual / no-both,
every --seeds, one budget: top-1 (mAP with --target segments) on test and ood.
Every finished run is appended at once as a JSON line to --runs; a rerun skips the runs already there and an
interrupted training resumes from its last epoch (TrainOptions.resume). --jobs N trains N models at once, in
processes of one thread each (every run uses one thread, so train_seconds compare). The tables (mean and sample
standard deviation over seeds, paired differences with a seeded bootstrap 95% interval, the select stage's val
scores, the VLM's contribution next to the interventions') come from the JSONL alone. Each table also shows what
naming the activity from the background alone scores (the confounder's shortcut, from the splits' backgrounds.csv):
a model at exactly that score learned nothing but the shortcut.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

# Candidate settings: CMDCLConfig overrides (docs/design.md section 8 explains each).
SETTINGS = {
    "design": {},
    "catt": {"approximator": "catt"},
    "catt+centre+temp": {"approximator": "catt", "key_norm": "centre", "learn_temperature": True},
    "catt+whiten+temp": {"approximator": "catt", "key_norm": "whiten", "learn_temperature": True},
    "fixed-keys": {"fixed_key_proj": True},
}
ABLATION_ORDER = ("none", "no-textual", "no-visual", "no-both")
TOWERS = ("random", "mini-vlm")
DRAWS = 10_000  # bootstrap resamples
# Fields that must agree for two runs to be compared (besides the setting, ablation and seed).
CONDITION = ("tower", "clip_sha256", "target", "epochs", "batch_size", "frames", "image_size", "text_init", "data")
KEY = ("stage", *CONDITION, "overrides", "ablation", "seed")
PROG = "intervention_ablation.py"


# ---- settings and runs -------------------------------------------------------------------------
def parse_setting(text: str) -> tuple[str, dict]:
    """(name, overrides) of a named setting, or of a JSON object (named by its compact text)."""
    if text in SETTINGS:
        return text, SETTINGS[text]
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        overrides = None
    if not isinstance(overrides, dict):
        raise ValueError(f"setting {text!r} is neither a named one ({', '.join(SETTINGS)}) nor a JSON object")
    return json.dumps(overrides, sort_keys=True, separators=(",", ":")), overrides


def run_key(row: dict) -> str:
    """What identifies a run: a rerun with the same key is skipped."""
    return json.dumps({k: row[k] for k in KEY}, sort_keys=True)


def condition_of(row: dict, without=()) -> str:
    return json.dumps({k: row[k] for k in CONDITION if k not in without}, sort_keys=True)


def read_runs(path: Path) -> list[dict]:
    """The rows of the JSONL; a line that is not a JSON object (a write cut short) is skipped with a warning."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and all(k in row for k in KEY):
            rows.append(row)
        elif line.strip():
            print(f"warning: {path}:{number}: not a run of this script, skipped", file=sys.stderr)
    return rows


def append_run(path: Path, row: dict) -> None:
    """One JSON line, on disk before the next run starts (a line cut short by a crash is closed first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metric_name(target: str) -> str:
    return "mAP" if target == "segments" else "top1"


def train_and_score(job: dict, work: str, keep_models: bool) -> dict:
    """Train one model, score it on its stage's splits (select: val only; ablate: test and ood); the JSONL row."""
    import torch

    from cmdcl.data.datasets import load_dataset
    from cmdcl.train.loop import TrainOptions, evaluate, train

    torch.set_num_threads(1)
    work = Path(work)
    out = work / "models" / f"{hashlib.sha256(run_key(job).encode()).hexdigest()[:16]}.pt"
    resume = out.with_name(out.name + ".resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = TrainOptions(
        data=str(work / "train" / "manifest.csv"), out=str(out), epochs=job["epochs"], batch_size=job["batch_size"],
        frames=job["frames"], image_size=job["image_size"], seed=job["seed"], ablation=job["ablation"],
        clip_weights=job["clip_weights"], text_init=job["text_init"], target=job["target"], cache_dir=str(work / "cache"),
        resume=True, model_options=job["overrides"],
    )
    resumed = resume.is_file()
    start = time.perf_counter()
    model = train(opts, command=job["command"], progress=False)
    seconds = time.perf_counter() - start
    metric = metric_name(job["target"])
    metrics = {}
    for split in ("val",) if job["stage"] == "select" else ("test", "ood"):
        data = load_dataset(work / split / "manifest.csv", classes=model.class_names, target=job["target"])
        metrics[f"{split}_{metric}"] = evaluate(model, data, cache_dir=str(work / "cache"))[metric]
    if not keep_models:
        out.unlink(missing_ok=True)
        resume.unlink(missing_ok=True)
    return {**job, "metrics": metrics, "final_train_loss": model.checkpoint_extra["history"][-1]["loss"],
            "train_seconds": round(seconds, 1), "resumed": resumed, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_jobs(jobs: list[dict], args, runs_path: Path) -> None:
    """Train the jobs (args.jobs at once), appending each row as it finishes."""
    total = len(jobs)

    def finished(row: dict, done: int) -> None:
        append_run(runs_path, row)
        scores = " ".join(f"{k} {100 * v:.1f}" for k, v in row["metrics"].items())
        print(f"[{done}/{total}] {row['stage']} {row['tower']} {row['setting']} {row['ablation']} seed {row['seed']}: "
              f"{scores} ({row['train_seconds']:.0f} s)", flush=True)

    if args.jobs == 1:
        for i, job in enumerate(jobs, 1):
            finished(train_and_score(job, str(args.work), args.keep_models), i)
        return
    import multiprocessing

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes before they import torch (train_and_score sets torch's too)
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(train_and_score, job, str(args.work), args.keep_models) for job in jobs}
        done = 0
        while pending:
            ready, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                done += 1
                finished(future.result(), done)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- statistics --------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def _resampled_means(values, rng, draws: int):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)


def paired_interval(differences: list[float], draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean per-seed difference (seeds resampled with replacement)."""
    import numpy as np

    means = _resampled_means(differences, np.random.default_rng(seed), draws)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def unpaired_interval(a: list[float], b: list[float], draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of mean(a) - mean(b), each group's seeds resampled on their own."""
    import numpy as np

    rng = np.random.default_rng(seed)
    differences = _resampled_means(a, rng, draws) - _resampled_means(b, rng, draws)
    return float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))


def select_setting(rows: list[dict], condition: str, candidates: list[tuple[str, dict]], seeds: list[int]) -> tuple[str, dict, dict]:
    """(name, overrides, {name: mean val score}) of the best candidate on `val` under `condition`.

    Ties (equal means) go to fewer overrides, then to the earlier candidate. Only select runs are read."""
    scores = {}
    for name, overrides in candidates:
        values = [r["metrics"][f"val_{metric_name(r['target'])}"] for r in rows
                  if r["stage"] == "select" and condition_of(r) == condition and r["overrides"] == overrides and r["seed"] in seeds]
        if len(values) < len(seeds):
            raise ValueError(f"setting {name}: {len(values)} of {len(seeds)} select runs found; run --stage select first")
        scores[name] = mean_sd(values)[0]
    best = best_setting(candidates, scores)
    return best[0], best[1], scores


def best_setting(candidates: list[tuple[str, dict]], scores: dict[str, float]) -> tuple[str, dict]:
    """The candidate with the highest score; ties (to 1e-9) go to fewer overrides, then to the earlier candidate."""
    return min(candidates, key=lambda c: (-round(scores[c[0]], 9), len(c[1]), candidates.index(c)))


# ---- tables ------------------------------------------------------------------------------------
def pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def describe_condition(row: dict) -> str:
    tower = "random tower" if row["tower"] == "random" else f"mini-VLM tower (weights sha256 {row['clip_sha256'][:12]})"
    d = row["data"]
    return (f"{tower}, target {row['target']}, epochs {row['epochs']}, batch {row['batch_size']}, frames {row['frames'] or 'preset'}, "
            f"image size {row['image_size'] or 'preset'}, text init {row['text_init']}; {d['train_videos']} training videos "
            f"(seed {d['data_seed']}), {d['eval_videos']} per eval split, val seed {d['val_seed']}")


def machines(rows: list[dict]) -> str:
    seconds = mean_sd([r["train_seconds"] for r in rows])[0]
    return f"machine: {'; '.join(sorted({r['machine'] for r in rows}))}; {seconds:.0f} s per training on average"


def group(rows: list[dict], key) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def values(rows: list[dict], ablation: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in rows if r["ablation"] == ablation}


def interval_text(mean: float, interval: tuple[float, float], n) -> str:
    return f"{100 * mean:+.1f} [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}] (n={n})"


def paired_cell(rows: list[dict], ablation: str, metric: str) -> str:
    """Full CMDCL minus `ablation` on the seeds both have: mean difference and bootstrap interval."""
    full, other = values(rows, "none", metric), values(rows, ablation, metric)
    diffs = [full[s] - other[s] for s in sorted(full.keys() & other.keys())]
    return interval_text(mean_sd(diffs)[0], paired_interval(diffs), len(diffs)) if diffs else "no common seeds"


def select_table(rows: list[dict]) -> list[str]:
    metric = f"val_{metric_name(rows[0]['target'])}"
    lines = [f"Select stage on `val`: {describe_condition(rows[0])}; {machines(rows)}.", "",
             f"| setting | overrides | seeds | {metric} % mean | sd |", "| --- | --- | --- | --- | --- |"]
    by_setting = group(rows, lambda r: r["setting"])
    scores = {setting: mean_sd([r["metrics"][metric] for r in runs]) for setting, runs in by_setting.items()}
    candidates = [(setting, runs[0]["overrides"]) for setting, runs in by_setting.items()]
    best, _ = best_setting(candidates, {setting: mean for setting, (mean, _) in scores.items()})
    for setting, runs in by_setting.items():
        mean, sd = scores[setting]
        seeds = " ".join(str(r["seed"]) for r in runs)
        mark = " (best)" if setting == best else ""
        lines.append(f"| {setting}{mark} | `{json.dumps(runs[0]['overrides'])}` | {seeds} | {pct(mean)} | {pct(sd)} |")
    return lines + shortcut_row(rows[0], [metric], "| – | – ")


def shortcut_row(row: dict, metrics: list[str], middle: str) -> list[str]:
    """The table row of the background-alone predictor, when the runs recorded it (activity labels on cmdcl-synth data)."""
    shortcut = row.get("shortcut") or {}
    if not all(shortcut.get(m) is not None for m in metrics):
        return []
    return ["| background alone (the shortcut) " + middle + "".join(f"| {pct(shortcut[m])} | – " for m in metrics) + "|"]


def ablation_tables(rows: list[dict]) -> list[str]:
    metric = metric_name(rows[0]["target"])
    splits = [f"{s}_{metric}" for s in ("test", "ood")]
    lines = [f"Ablation, setting {rows[0]['setting']} (`{json.dumps(rows[0]['overrides'])}`): {describe_condition(rows[0])}; "
             f"{machines(rows)}.", "",
             "| model | seeds | " + " | ".join(f"{s} % mean | sd" for s in splits) + " |", "| --- | --- |" + " --- | --- |" * len(splits)]
    present = [a for a in ABLATION_ORDER if any(r["ablation"] == a for r in rows)]
    for ablation in present:
        cells = []
        for split in splits:
            mean, sd = mean_sd(list(values(rows, ablation, split).values()))
            cells += [pct(mean), pct(sd)]
        seeds = " ".join(str(s) for s in sorted(values(rows, ablation, splits[0])))
        lines.append(f"| {'full CMDCL' if ablation == 'none' else ablation} | {seeds} | " + " | ".join(cells) + " |")
    lines += shortcut_row(rows[0], splits, "| – ")
    if "none" in present and len(present) > 1:
        lines += ["", "Full CMDCL minus each ablation, paired by seed, percentage points: mean [bootstrap 95% interval].", "",
                  "| difference | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
        for ablation in present[1:]:
            lines.append(f"| full − {ablation} | " + " | ".join(paired_cell(rows, ablation, split) for split in splits) + " |")
    return lines


def contribution_table(groups: list[list[dict]]) -> list[str]:
    """The mini-VLM's own contribution (mini-VLM minus random tower, both without interventions) next to the interventions'
    (full minus no-both within each tower): for groups that differ only in tower."""
    random = [g for g in groups if g[0]["tower"] == "random"]
    vlm = [g for g in groups if g[0]["tower"] == "mini-vlm"]
    lines = []
    for r in random:
        for v in vlm:
            if condition_of(r[0], ("tower", "clip_sha256")) != condition_of(v[0], ("tower", "clip_sha256")):
                continue
            metric = metric_name(r[0]["target"])
            lines += ["", f"VLM against interventions, target {r[0]['target']}, epochs {r[0]['epochs']} (random tower: setting "
                      f"{r[0]['setting']}; mini-VLM: setting {v[0]['setting']}), percentage points, mean [bootstrap 95% interval]. "
                      "The VLM's row resamples each tower's seeds on its own; the interventions' rows pair seeds.", "",
                      f"| difference | test_{metric} | ood_{metric} |", "| --- | --- | --- |"]
            splits = (f"test_{metric}", f"ood_{metric}")
            cells = []
            for split in splits:
                a, b = list(values(v, "no-both", split).values()), list(values(r, "no-both", split).values())
                difference = mean_sd(a)[0] - mean_sd(b)[0] if a and b else None
                cells.append("–" if difference is None else interval_text(difference, unpaired_interval(a, b), f"{len(a)}/{len(b)}"))
            lines.append("| VLM: mini-VLM − random tower (no-both) | " + " | ".join(cells) + " |")
            for name, g in (("random tower", r), ("mini-VLM", v)):
                cells = [paired_cell(g, "no-both", split) for split in splits]
                lines.append(f"| interventions, {name}: full − no-both | " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict]) -> str:
    """Every table the JSONL supports, in Markdown."""
    lines = ["# Intervention ablation (benchmarks/intervention_ablation.py)", ""]
    select = [r for r in rows if r["stage"] == "select"]
    ablate = [r for r in rows if r["stage"] == "ablate"]
    if not rows:
        return "\n".join(lines + ["No runs yet."]) + "\n"
    if select:
        lines += ["## Selection (val only)", ""]
        for runs in group(select, condition_of).values():
            lines += select_table(runs) + [""]
    if ablate:
        lines += ["## Ablation (test and ood)", ""]
        groups = list(group(ablate, lambda r: (condition_of(r), json.dumps(r["overrides"], sort_keys=True))).values())
        for runs in groups:
            lines += ablation_tables(runs) + [""]
        contribution = contribution_table(groups)
        if contribution:
            lines += ["## The mini-VLM's contribution against the interventions'"] + contribution + [""]
    return "\n".join(lines)


# ---- data and command line ---------------------------------------------------------------------
def prepare_data(args) -> None:
    """Generate the four splits once; a --work made with other data options is refused, never mixed."""
    from cmdcl.data.synth import generate

    data = data_options(args)
    record = args.work / "data.json"
    if record.is_file() and json.loads(record.read_text()) != data:
        raise ValueError(f"{record}: --work was generated with {record.read_text().strip()}, not {json.dumps(data)}; use another --work")
    args.work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data) + "\n")
    splits = {"train": (args.train_videos, args.data_seed, "train"), "test": (args.eval_videos, args.data_seed, "test"),
              "ood": (args.eval_videos, args.data_seed, "ood"), "val": (args.eval_videos, args.val_seed, "test")}
    for name, (videos, seed, kind) in splits.items():
        if not (args.work / name / "manifest.csv").is_file():
            generate(args.work / name, videos, seed, kind, progress=True)


def shortcut_top1(split_dir: Path) -> float | None:
    """Top-1 of naming each video's activity from its background alone (the activity whose home it is): what a model
    that learned only the confounder scores; None when the split has no backgrounds.csv."""
    import csv

    from cmdcl.data.datasets import load_dataset
    from cmdcl.data.synth import BACKGROUNDS

    path = split_dir / "backgrounds.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        texture = {r["video"]: r["label"] for r in csv.DictReader(f)}
    home = {t: activity for activity, (_, t) in enumerate(BACKGROUNDS)}
    entries = load_dataset(split_dir / "manifest.csv").entries
    return sum(home[texture[e.path.name]] == e.labels[0] for e in entries) / len(entries)


def data_options(args) -> dict:
    return {"train_videos": args.train_videos, "eval_videos": args.eval_videos, "data_seed": args.data_seed, "val_seed": args.val_seed}


def base_job(args, tower: str, stage: str, machine: str) -> dict:
    weights = args.clip_weights if tower == "mini-vlm" else None
    splits = ("val",) if stage == "select" else ("test", "ood")
    shortcut = {f"{split}_top1": shortcut_top1(args.work / split) for split in splits} if args.target == "label" else {}
    return {"stage": stage, "tower": tower, "clip_weights": weights, "clip_sha256": sha256_file(weights) if weights else None,
            "target": args.target, "epochs": args.epochs, "batch_size": args.batch_size, "frames": args.frames,
            "image_size": args.image_size, "text_init": args.text_init, "data": data_options(args), "machine": machine, "threads": 1,
            "command": shlex.join(["python", *sys.argv]), "shortcut": shortcut}


def plan(args, stage: str, rows: list[dict], machine: str) -> list[dict]:
    """The runs of `stage` not yet in `rows`."""
    done = {run_key(r) for r in rows}
    jobs = []
    candidates = [parse_setting(c) for c in args.candidates]
    for tower in args.towers:
        base = base_job(args, tower, stage, machine)
        if stage == "select":
            runs = [(name, overrides, "none", seed) for name, overrides in candidates for seed in args.select_seeds]
        else:
            if args.setting:
                name, overrides = parse_setting(args.setting)
            else:
                name, overrides, _ = select_setting(rows, condition_of(base), candidates, args.select_seeds)
            runs = [(name, overrides, ablation, seed) for seed in args.seeds for ablation in args.ablations]
        for name, overrides, ablation, seed in runs:
            job = {**base, "setting": name, "overrides": overrides, "ablation": ablation, "seed": seed}
            if run_key(job) not in done:
                jobs.append(job)
    return jobs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Where the splits, caches and models go (required unless --report-only).")
    parser.add_argument("--runs", type=Path, default=Path(__file__).resolve().parent / "intervention_ablation_runs.jsonl")
    parser.add_argument("--markdown", type=Path, help="Also write the tables here.")
    parser.add_argument("--report-only", action="store_true", help="Only the tables, from --runs.")
    parser.add_argument("--stage", default="all", choices=["select", "ablate", "all"])
    parser.add_argument("--towers", "--tower", nargs="+", default=["random"], choices=TOWERS)
    parser.add_argument("--clip-weights", help="The mini-VLM's CLIP weights (cmdcl-mini-vlm), for --towers mini-vlm.")
    parser.add_argument("--candidates", nargs="+", default=list(SETTINGS), help=f"Named ({', '.join(SETTINGS)}) or JSON overrides.")
    parser.add_argument("--setting", help="Ablate this setting (named or JSON) instead of the selected one.")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATION_ORDER), choices=ABLATION_ORDER)
    parser.add_argument("--target", default="label", choices=["label", "segments"], help="segments: atomic actions, multi-label, mAP")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, help="F (default: the preset's)")
    parser.add_argument("--image-size", type=int, help="default: the preset's (or the CLIP weights')")
    parser.add_argument("--text-init", default="auto")
    parser.add_argument("--train-videos", type=int, default=280)
    parser.add_argument("--eval-videos", type=int, default=140)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--val-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="Trainings at once (one thread each).")
    parser.add_argument("--keep-models", action="store_true", help="Keep each run's checkpoint in --work/models.")
    parser.add_argument("--debug", action="store_true", help="Tracebacks on errors.")
    return parser.parse_args(argv)


def check_args(args) -> None:
    if args.report_only:
        return
    if args.work is None:
        raise ValueError("--work is required (unless --report-only)")
    if "mini-vlm" in args.towers and not args.clip_weights:
        raise ValueError("--towers mini-vlm needs --clip-weights (a file made by cmdcl-mini-vlm)")
    if args.clip_weights and not Path(args.clip_weights).is_file():
        raise ValueError(f"{args.clip_weights}: no such CLIP weights file")
    if args.val_seed == args.data_seed:
        raise ValueError(f"--val-seed {args.val_seed} equals --data-seed: val would repeat test's videos")
    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    for text in args.candidates + ([args.setting] if args.setting else []):
        parse_setting(text)


def main(argv=None) -> None:
    from cmdcl.bench.measure import cpu_model
    from cmdcl.cli.errors import WITH_DATA_ERRORS, cli_errors, end_on_sigterm
    from cmdcl.output_files import atomic_write, check_outputs

    args = parse_args(argv)
    end_on_sigterm()

    def interrupted() -> str:
        return f"; the finished runs are in {args.runs}: the same command continues"

    with cli_errors(PROG, args.debug, expected=WITH_DATA_ERRORS, interrupted=interrupted):
        check_args(args)
        if args.markdown:
            check_outputs([("--markdown", args.markdown)], [("--runs", args.runs)])
        if not args.report_only:
            import torch

            torch.set_num_threads(1)
            prepare_data(args)
            machine = f"{cpu_model()}, {os.cpu_count()} cores, CPU only"
            for stage in ("select", "ablate") if args.stage == "all" else (args.stage,):
                jobs = plan(args, stage, read_runs(args.runs), machine)
                print(f"{stage}: {len(jobs)} runs to train", flush=True)
                run_jobs(jobs, args, args.runs)
        text = report(read_runs(args.runs))
        print(text)
        if args.markdown:
            with atomic_write(args.markdown) as tmp:
                tmp.write_text(text)


if __name__ == "__main__":
    main()
