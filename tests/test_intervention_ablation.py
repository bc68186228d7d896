"""benchmarks/intervention_ablation.py: its statistics recomputed independently, resuming, selection on val only, and
one real end-to-end run on a 4-video world."""

import importlib.util
import itertools
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "intervention_ablation.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("intervention_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DATA = {"train_videos": 4, "eval_videos": 2, "data_seed": 0, "val_seed": 1}


def row(stage="ablate", ablation="none", seed=0, metrics=None, tower="random", setting="design", overrides=None, **fields):
    """A hand-made JSONL row."""
    base = {"stage": stage, "tower": tower, "clip_weights": None, "clip_sha256": None if tower == "random" else "ab" * 32,
            "target": "label", "epochs": 10, "batch_size": 8, "frames": None, "image_size": None, "text_init": "auto", "data": DATA,
            "setting": setting, "overrides": overrides or {}, "ablation": ablation, "seed": seed, "metrics": metrics,
            "final_train_loss": 0.5, "train_seconds": 100.0, "machine": "test CPU", "command": "test"}
    return {**base, **fields}


def exact_percentiles(values):
    """2.5% and 97.5% quantiles of the mean over all n^n equally likely resamples (the law the bootstrap samples)."""
    means = [sum(c) / len(c) for c in itertools.product(values, repeat=len(values))]
    return tuple(np.percentile(means, q, method="inverted_cdf") for q in (2.5, 97.5))


def table_row(markdown: str, first_cell: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


# ---- statistics -------------------------------------------------------------------------------
def test_bootstrap_interval_of_two_seeds_is_their_range(ablation):
    # Resampling two differences gives a (1/4), their mean (1/2) or b (1/4): the 2.5 and 97.5 percentiles are a and b.
    assert ablation.paired_interval([0.10, -0.04]) == (-0.04, 0.10)
    # mean(a) - mean(b) with a = [x]: x - b1, x - mean(b) or x - b2, so the interval is x - max(b) to x - min(b).
    assert ablation.unpaired_interval([0.5], [0.2, 0.3]) == pytest.approx((0.2, 0.3))


def test_bootstrap_interval_matches_the_exact_resampling_law(ablation):
    differences = [0.05, -0.02, 0.10, 0.03, 0.00]
    low, high = exact_percentiles(differences)
    got = ablation.paired_interval(differences)
    assert got == pytest.approx((low, high), abs=0.006)
    assert got == ablation.paired_interval(differences)  # seeded: the same interval every time


def test_report_mean_sd_and_paired_differences_recomputed_by_hand(ablation):
    full = {0: (0.80, 0.30), 1: (0.70, 0.25), 2: (0.90, 0.35)}  # seed: (test, ood)
    no_both = {2: (0.80, 0.20), 0: (0.75, 0.33), 1: (0.72, 0.21)}  # listed out of seed order: pairing must go by seed
    rows = [row(ablation="none", seed=s, metrics={"test_top1": t, "ood_top1": o}) for s, (t, o) in full.items()]
    rows += [row(ablation="no-both", seed=s, metrics={"test_top1": t, "ood_top1": o}) for s, (t, o) in no_both.items()]
    markdown = ablation.report(rows)

    cells = table_row(markdown, "full CMDCL")
    test, ood = [v[0] for v in full.values()], [v[1] for v in full.values()]
    assert cells[1:] == ["0 1 2", f"{100 * statistics.mean(test):.1f}", f"{100 * statistics.stdev(test):.1f}",
                         f"{100 * statistics.mean(ood):.1f}", f"{100 * statistics.stdev(ood):.1f}"]
    cells = table_row(markdown, "no-both")
    assert cells[2] == f"{100 * statistics.mean(v[0] for v in no_both.values()):.1f}"

    differences = [full[s][0] - no_both[s][0] for s in (0, 1, 2)]  # 0.05, -0.02, 0.10
    low, high = exact_percentiles(differences)  # each extreme has probability 1/27 > 2.5%: the interval is [-2, 10] points
    mean, got_low, got_high = (float(x) for x in
                               table_row(markdown, "full − no-both")[1].replace("[", "").replace("]", "").replace(",", "").split()[:3])
    assert mean == pytest.approx(100 * statistics.mean(differences), abs=0.051)
    assert (got_low, got_high) == pytest.approx((100 * low, 100 * high), abs=0.051)


def test_vlm_contribution_compares_no_both_across_towers(ablation):
    rows = []
    for seed in (0, 1):
        rows.append(row(ablation="no-both", seed=seed, metrics={"test_top1": 0.5, "ood_top1": 0.2 + 0.1 * seed}))
        rows.append(row(ablation="none", seed=seed, metrics={"test_top1": 0.6, "ood_top1": 0.3}))
        rows.append(row(ablation="no-both", seed=seed, tower="mini-vlm", metrics={"test_top1": 0.7, "ood_top1": 0.6}))
        rows.append(row(ablation="none", seed=seed, tower="mini-vlm", metrics={"test_top1": 0.7, "ood_top1": 0.6}))
    markdown = ablation.report(rows)
    cells = table_row(markdown, "VLM: mini-VLM − random tower (no-both)")
    assert cells[1].startswith("+20.0 [+20.0, +20.0]")  # test: 0.7 - 0.5 on every seed
    assert cells[2].startswith("+35.0 [+30.0, +40.0]")  # ood: 0.6 - {0.2, 0.3}
    assert table_row(markdown, "interventions, mini-VLM: full − no-both")[1].startswith("+0.0")
    assert table_row(markdown, "interventions, random tower: full − no-both")[1].startswith("+10.0")


def test_best_setting_breaks_ties_towards_fewer_overrides(ablation):
    candidates = [("catt", {"approximator": "catt"}), ("design", {}), ("other", {"key_norm": "centre", "approximator": "catt"})]
    assert ablation.best_setting(candidates, {"catt": 0.5, "design": 0.5, "other": 0.4}) == ("design", {})
    assert ablation.best_setting(candidates, {"catt": 0.51, "design": 0.5, "other": 0.4})[0] == "catt"


def test_shortcut_is_the_share_of_videos_on_their_activitys_home_background(ablation, tmp_path):
    from cmdcl.data.synth import ACTIVITIES

    # Homes, by the benchmark's definition: make tea -> plain, make coffee -> hstripes, fry egg -> checker, make juice -> noise.
    videos = [("make tea", "plain"), ("make coffee", "checker"), ("fry egg", "checker"), ("make juice", "plain")]  # 2 of 4 at home
    (tmp_path / "classes.txt").write_text("\n".join(ACTIVITIES) + "\n")
    lines = [f"v{i}.mp4,{activity},0.00:1.00:pour\n" for i, (activity, _) in enumerate(videos)]
    for i in range(len(videos)):
        (tmp_path / f"v{i}.mp4").touch()  # listed files must exist; they are never read
    (tmp_path / "manifest.csv").write_text("path,label,segments\n" + "".join(lines))
    (tmp_path / "backgrounds.csv").write_text("video,label\n" + "".join(f"v{i}.mp4,{t}\n" for i, (_, t) in enumerate(videos)))
    assert ablation.shortcut_top1(tmp_path) == 0.5
    (tmp_path / "backgrounds.csv").unlink()
    assert ablation.shortcut_top1(tmp_path) is None


# ---- runs with the training mocked ------------------------------------------------------------
@pytest.fixture
def fake_training(monkeypatch):
    """Training, evaluation and video generation replaced by fakes that record what they were asked."""
    import cmdcl.data.datasets
    import cmdcl.data.synth
    import cmdcl.train.loop

    calls = SimpleNamespace(trained=[], loaded=[], interrupt_at=None, scores={})

    def generate(out, videos, seed, split, progress=False):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "manifest.csv").write_text(f"{videos} {seed} {split}\n")

    def train(opts, command="", progress=True):
        if len(calls.trained) == calls.interrupt_at:
            raise KeyboardInterrupt
        calls.trained.append(opts)
        return SimpleNamespace(class_names=["a"], checkpoint_extra={"history": [{"loss": 0.5}]}, opts=opts)

    def load_dataset(path, split="train", classes=None, target="label"):
        calls.loaded.append(Path(path))
        return Path(path)

    def evaluate(model, data, cache_dir=None):
        return {"top1": calls.scores.get(json.dumps(model.opts.model_options), 0.5) + 0.01 * model.opts.seed}

    monkeypatch.setattr(cmdcl.data.synth, "generate", generate)
    monkeypatch.setattr(cmdcl.train.loop, "train", train)
    monkeypatch.setattr(cmdcl.train.loop, "evaluate", evaluate)
    monkeypatch.setattr(cmdcl.data.datasets, "load_dataset", load_dataset)
    return calls


def test_rerun_skips_finished_runs_and_an_interrupt_loses_only_the_run_in_progress(ablation, fake_training, tmp_path):
    runs = tmp_path / "runs.jsonl"
    argv = ["--work", str(tmp_path / "w"), "--runs", str(runs), "--stage", "ablate", "--setting", "design", "--seeds", "0", "1"]
    fake_training.interrupt_at = 5  # Ctrl-C during the 6th of 8 trainings
    with pytest.raises(SystemExit) as stopped:
        ablation.main(argv)
    assert stopped.value.code == 130
    assert len(ablation.read_runs(runs)) == 5

    fake_training.interrupt_at = None
    ablation.main(argv)
    assert len(fake_training.trained) == 8  # 5, then the 3 missing
    finished = ablation.read_runs(runs)
    assert sorted((r["ablation"], r["seed"]) for r in finished) == sorted((a, s) for a in ablation.ABLATION_ORDER for s in (0, 1))

    ablation.main(argv)
    assert len(fake_training.trained) == 8  # everything was there: nothing trained


def test_selection_scores_full_models_on_val_only_and_ablate_uses_the_winner(ablation, fake_training, tmp_path):
    work, runs = tmp_path / "w", tmp_path / "runs.jsonl"
    fake_training.scores = {json.dumps({"approximator": "catt"}): 0.7}
    argv = ["--work", str(work), "--runs", str(runs), "--candidates", "design", "catt", "--select-seeds", "0", "1"]
    ablation.main([*argv, "--stage", "select"])
    assert len(fake_training.trained) == 4
    assert {opts.ablation for opts in fake_training.trained} == {"none"}
    assert all(opts.val is None for opts in fake_training.trained)
    assert set(fake_training.loaded) == {work / "val" / "manifest.csv"}  # never test or ood

    fake_training.loaded.clear()
    ablation.main([*argv, "--stage", "ablate", "--seeds", "0"])
    ablated = fake_training.trained[4:]
    assert [opts.model_options for opts in ablated] == [{"approximator": "catt"}] * 4
    assert set(fake_training.loaded) == {work / "test" / "manifest.csv", work / "ood" / "manifest.csv"}
    assert (work / "val" / "manifest.csv").read_text() == "140 1 test\n" != (work / "test" / "manifest.csv").read_text()


def test_val_seed_equal_to_data_seed_is_refused_in_one_line(ablation, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        ablation.main(["--work", str(tmp_path), "--runs", str(tmp_path / "r.jsonl"), "--val-seed", "0"])
    assert failed.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-seed 0 equals --data-seed" in err


# ---- end to end -------------------------------------------------------------------------------
def test_end_to_end_tiny_world_writes_runs_and_markdown(ablation, tmp_path, capsys):
    runs, markdown = tmp_path / "runs.jsonl", tmp_path / "tables.md"
    argv = ["--work", str(tmp_path / "w"), "--runs", str(runs), "--markdown", str(markdown), "--train-videos", "4",
            "--eval-videos", "2", "--frames", "4", "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--text-init", "random",
            "--candidates", "design", "--seeds", "0", "--ablations", "none", "no-both"]
    ablation.main(argv)
    rows = ablation.read_runs(runs)
    assert [(r["stage"], r["ablation"]) for r in rows] == [("select", "none"), ("ablate", "none"), ("ablate", "no-both")]
    assert set(rows[0]["metrics"]) == {"val_top1"} and set(rows[1]["metrics"]) == {"test_top1", "ood_top1"}
    assert all(0 <= v <= 1 for r in rows for v in r["metrics"].values())
    assert not list((tmp_path / "w" / "models").iterdir())  # checkpoints removed once recorded
    text = markdown.read_text()
    assert "## Selection (val only)" in text and "| full − no-both |" in text
    select_row, ablate_row = ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
                              if line.startswith("| background alone (the shortcut) |"))
    assert select_row[3] == f"{100 * rows[0]['shortcut']['val_top1']:.1f}"
    assert ablate_row[2::2] == [f"{100 * rows[1]['shortcut'][m]:.1f}" for m in ("test_top1", "ood_top1")]

    capsys.readouterr()
    ablation.main(argv)
    assert "select: 0 runs to train" in capsys.readouterr().out
    assert len(ablation.read_runs(runs)) == 3
