"""Video mode decodes files in worker processes while the model runs (issue 12, item 3).

Every test is bounded: runs that could hang go through `finishes_within` or a
subprocess timeout, and slow decoding is simulated with a sleep, not real work."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cmdcl.runtime.recognizer as recognizer_module
from cmdcl.bench.measure import PeakMemory
from cmdcl.data.video import write_video
from cmdcl.runtime import Recognizer
from cmdcl.runtime.decode_pool import decoded_in_order
from conftest import default_sigint
from test_runtime import moving_square, tiny_checkpoint  # noqa: F401 - a fixture
from test_stream_reliability import EchoBackend, finishes_within


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six short videos of different lengths (so that workers finish out of order) and three bad inputs."""
    d = tmp_path_factory.mktemp("clips")
    good = [write_video(d / f"v{i}.mp4", moving_square(n, i), rate=10) for i, n in enumerate([60, 8, 30, 12, 45, 10])]
    (d / "not-a-video.mp4").write_bytes(b"this is not a video")
    truncated = d / "truncated.mp4"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    return {"good": good, "bad": [d / "missing.mp4", d / "not-a-video.mp4", truncated]}


WAIT = 60  # seconds a staged read waits for the step before it (it never takes that long)


def recognizer(workers, **kwargs):
    return Recognizer(EchoBackend(), workers=workers, **kwargs)


def summaries(recognizer, paths):
    return finishes_within(60, lambda: list(recognizer.predict_many(paths)))


# ---- the same records, in order ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
def test_records_are_identical_with_one_and_two_workers(clips, batch):
    good, bad = clips["good"], clips["bad"]
    paths = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5]]
    one = summaries(recognizer(1, batch=batch), paths)
    two = summaries(recognizer(2, batch=batch), paths)
    assert one == two
    assert [r["video"] for r in two] == [str(p) for p in paths]
    assert [("error" in r) for r in two] == [p in bad for p in paths]


def test_the_cli_writes_the_same_records_with_one_and_two_workers(clips, tiny_checkpoint, tmp_path):  # noqa: F811
    paths = [*clips["good"], clips["bad"][1]]
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.jsonl"
        result = subprocess.run([sys.executable, "-m", "cmdcl.cli.run", *map(str, paths), "--engine", str(tiny_checkpoint), "--workers",
                                 str(workers), "--batch", "2", "-o", str(out), "-q"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 3, result.stderr
        assert result.stderr.splitlines() == [f"cmdcl-run: {clips['bad'][1]}: not a video (Invalid data found when processing input)"]
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert [json.loads(line)["video"] for line in outputs[1].splitlines()] == [str(p) for p in paths]


def test_one_worker_reads_in_this_process_and_two_in_others(clips):
    pids = []

    def read(path):
        pids.append(os.getpid())
        return os.getpid()

    assert {pid for _, pid in decoded_in_order(clips["good"], read, 1, 2)} == {os.getpid()} == set(pids)
    others = {pid for _, pid in finishes_within(30, lambda: list(decoded_in_order(clips["good"], read, 2, 4)))}
    assert os.getpid() not in others and 1 <= len(others) <= 2


@pytest.mark.parametrize("workers", [0, 65])
def test_workers_are_bounded(workers, tiny_checkpoint, clips):  # noqa: F811
    with pytest.raises(ValueError, match="workers must be between 1 and 64"):
        recognizer(workers)
    result = subprocess.run([sys.executable, "-m", "cmdcl.cli.run", str(clips["good"][0]), "--engine", str(tiny_checkpoint), "--workers",
                             str(workers)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("Error:") and "Traceback" not in result.stderr


# ---- failures stay with their input -------------------------------------------------------------------------
def test_an_unexpected_error_in_a_worker_is_its_inputs_record_with_the_traceback_in_debug(clips, monkeypatch, capsys):
    good = clips["good"]
    real = recognizer_module.read_clip

    def buggy(path, *args, **kwargs):
        if path == good[1]:
            raise RuntimeError("a bug in the reader\nsecond line")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(recognizer_module, "read_clip", buggy)  # forked workers inherit it
    records = summaries(recognizer(2, debug=True), good[:4])
    assert records[1] == {"video": str(good[1]), "summary": True, "error": "unexpected RuntimeError: a bug in the reader"}
    assert all("error" not in r for i, r in enumerate(records) if i != 1)
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the reader" in err  # printed by this process, from the worker's text


def test_a_killed_worker_fails_its_file_and_the_run_goes_on(clips, monkeypatch, tmp_path):
    """The worker reading `victim` (the 2nd file) dies by SIGKILL once the other worker is reading the 3rd file, so the
    record of the file it died on must be told from the latest one handed out; that other worker then holds its file
    until a new worker has started on the 4th. Each step waits for the one before (events shared with the forked
    workers), not for time to pass: the victim's file gets the error record, a new worker takes over, and every other
    file is classified."""
    good = clips["good"]
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(good[0].read_bytes())
    paths = [good[0], victim, *good[1:]]
    log = tmp_path / "reads.log"
    events = multiprocessing.get_context("fork")
    third_started, fourth_started = events.Event(), events.Event()
    real = recognizer_module.read_clip

    def staged(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {Path(path).name}\n")
        position = paths.index(path)
        if position == 1:
            assert third_started.wait(WAIT), "the third file was never started"
            os.kill(os.getpid(), signal.SIGKILL)
        if position == 2:
            third_started.set()
            assert fourth_started.wait(WAIT), "no worker took over from the killed one"
        if position == 3:
            fourth_started.set()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(recognizer_module, "read_clip", staged)  # forked workers inherit it
    records = summaries(recognizer(2), paths)
    assert records[1] == {"video": str(victim), "summary": True, "error": "the decoding process died (killed by SIGKILL)"}
    assert all("error" not in r for i, r in enumerate(records) if i != 1)
    readers = {name: pid for pid, name in (line.split() for line in log.read_text().splitlines())}
    assert readers[good[2].name] not in {readers[good[0].name], readers["victim.mp4"]}  # the new worker read the 4th file


def test_evaluation_decodes_in_workers_and_names_a_killed_workers_video(clips, tmp_path, monkeypatch):
    from cmdcl.data.datasets import load_dataset
    from cmdcl.train import loop

    good = clips["good"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate([*good, clips["bad"][1]])))
    dataset = load_dataset(manifest)
    skipped_one, skipped_two = {}, {}
    one = loop.decode_clips(dataset, 4, 32, skipped=skipped_one, workers=1)
    two = finishes_within(60, loop.decode_clips, dataset, 4, 32, None, False, skipped_two, "exact", 2)
    assert np.array_equal(one.numpy(), two.numpy()) and skipped_one == skipped_two
    assert skipped_two == {6: f"{manifest}:8: {clips['bad'][1]}: not a video (Invalid data found when processing input)"}

    real = loop.read_entry_clip
    fourth_started = multiprocessing.get_context("fork").Event()

    def dies_on_the_third(entry, *args, **kwargs):  # once the 4th video is being read: the 3rd is not the latest handed out
        if entry.path == good[3]:
            fourth_started.set()
        if entry.path == good[2]:
            assert fourth_started.wait(WAIT), "the fourth video was never started"
            os.kill(os.getpid(), signal.SIGKILL)
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(loop, "read_entry_clip", dies_on_the_third)
    skipped = {}
    clips_left = finishes_within(60, loop.decode_clips, dataset, 4, 32, None, False, skipped, "exact", 2)
    assert skipped[2] == f"{manifest}:4: {good[2]}: the decoding process died (killed by SIGKILL)" and len(skipped) == 2
    assert len(clips_left) == 5


# ---- bounded memory -----------------------------------------------------------------------------------------
def test_decoding_runs_a_bounded_number_of_files_ahead_and_memory_stays_bounded(tmp_path, monkeypatch):
    """200 inputs, each clip 16 x 224 x 224 x 3 (2.4 MB: 480 MB for all), consumed slowly: the workers
    start at most `batch + 2 * workers` files ahead of the records taken, and this process's RSS grows
    by much less than all the clips would take."""
    small = write_video(tmp_path / "small.mp4", moving_square(8, 3), rate=10)
    paths = [small] * 200
    log = tmp_path / "started.log"
    real = recognizer_module.read_clip

    def logged(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write("x")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(recognizer_module, "read_clip", logged)
    rec = Recognizer(EchoBackend(num_frames=16, image_size=224), workers=2, batch=1)
    clip_mb = 16 * 224 * 224 * 3 / 2**20
    ahead = []

    def consume():
        with PeakMemory() as memory:
            for taken, record in enumerate(rec.predict_many(paths), 1):
                assert "error" not in record
                ahead.append(log.stat().st_size - taken)
                time.sleep(0.01)  # a model slower than the decoding: unbounded prefetch would run ahead
        return memory

    before = PeakMemory()
    with before:
        pass
    memory = finishes_within(120, consume)
    assert len(ahead) == 200 and max(ahead) <= 1 + 2 * 2
    if memory.host_exact:
        assert memory.host_mb - before.host_mb < 40 * clip_mb  # 480 MB if every clip were held


# ---- stopping -----------------------------------------------------------------------------------------------
SLOW_RUN = """
import os, sys, time
import cmdcl.runtime.recognizer as r
real = r.read_clip
def slow(path, *args, **kwargs):  # from the 4th file on, a decode that takes a minute
    if int(os.path.basename(str(path)).split(".")[0]) >= 3:
        time.sleep(60)
    return real(path, *args, **kwargs)
r.read_clip = slow
from cmdcl.cli.run import main
main()
"""


def children(pid):
    """Pids of the live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("sig, to_group, status, stopped", [(signal.SIGINT, True, 130, "interrupted"),
                                                             (signal.SIGTERM, False, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_stops_the_workers_at_once_with_complete_lines(clips, tiny_checkpoint, tmp_path, sig, to_group, status,  # noqa: F811
                                                                          stopped):
    """Ctrl-C in a terminal signals the whole process group (workers too), SIGTERM the run alone: either
    way the run ends within seconds though its workers are in the middle of minute-long reads, no worker
    prints a traceback or outlives it, and the output holds only complete records."""
    paths = [tmp_path / f"{i}.mp4" for i in range(12)]
    for i, path in enumerate(paths):
        path.write_bytes(clips["good"][i % 6].read_bytes())
    out = tmp_path / "out.jsonl"
    args = [*map(str, paths), "--engine", str(tiny_checkpoint), "--workers", "2", "-o", str(out), "-q"]
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=default_sigint, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        partial = out.with_name(out.name + ".partial")
        deadline = time.time() + 60
        while time.time() < deadline and (not partial.exists() or partial.read_text().count("\n") < 3 or len(children(process.pid)) < 2):
            time.sleep(0.05)
        workers = children(process.pid)
        assert process.poll() is None and len(workers) == 2, "the run did not reach its slow files with two workers"
        time.sleep(0.5)  # both workers are in their minute-long reads
        signalled = time.time()
        os.killpg(process.pid, sig) if to_group else process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
        took = time.time() - signalled
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert process.returncode == status, stderr
    assert took < 10
    assert stderr.decode().strip().splitlines() == [f"cmdcl-run: {stopped}; the records so far are in {out}"]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["video"] == str(paths[i]) for i, line in enumerate(lines))
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the run"


# ---- the benchmark ------------------------------------------------------------------------------------------
def test_bench_measures_end_to_end_with_one_and_n_workers_and_the_pipeline_efficiency(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cmdcl.cli.bench import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["--backend", "ort", "--preset", "tiny", "--frames", "2", "--classes", "5", "--iters", "1",
                                       "--warmup", "0", "--stages", "end_to_end_workers", "--workers", "2", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    serial, parallel = (next(r for r in report["records"] if r["stage"] == stage) for stage in ("end_to_end_serial", "end_to_end_parallel"))
    assert "1 decoding worker," in serial["note"] and "2 decoding workers" in parallel["note"] and "720" in parallel["note"]
    assert "predictions identical to 1 worker" in parallel["note"]
    assert 0 < parallel["pipeline_efficiency"] <= 1.5 and serial["pipeline_efficiency"] is None
    (comparison,) = [c for c in report["comparisons"] if c["comparison"] == "N decoding workers vs 1 (end to end)"]
    assert comparison["speedup"] > 0 and comparison["efficiency"] == parallel["pipeline_efficiency"]
    assert "pipeline efficiency" in result.output


def test_workers_die_with_a_run_killed_by_sigkill(clips, tiny_checkpoint, tmp_path):  # noqa: F811
    """The OOM killer's SIGKILL leaves no cleanup to the run: its workers, in the middle of minute-long
    reads, must still go at once (not a minute later, and never print a traceback)."""
    paths = [tmp_path / f"{i}.mp4" for i in range(6)]
    for i, path in enumerate(paths):
        path.write_bytes(clips["good"][i].read_bytes())
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *map(str, paths), "--engine", str(tiny_checkpoint), "--workers", "2",
                                "-o", str(tmp_path / "out.jsonl"), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (len(children(process.pid)) < 2 or not (tmp_path / "out.jsonl.partial").exists()
                                          or (tmp_path / "out.jsonl.partial").read_text().count("\n") < 3):
            time.sleep(0.05)
        workers = children(process.pid)
        assert len(workers) == 2
        process.kill()
        _, stderr = process.communicate(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
            time.sleep(0.05)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its run"
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert stderr == b""


def test_the_default_worker_count_is_one_per_core_up_to_the_limit(monkeypatch):
    from cmdcl.runtime import decode_pool

    monkeypatch.setattr(decode_pool, "usable_cores", lambda: 3)
    assert decode_pool.default_workers() == 3
    monkeypatch.setattr(decode_pool, "usable_cores", lambda: 200)  # a big machine: not an error, the most allowed
    assert decode_pool.default_workers() == decode_pool.MAX_WORKERS == decode_pool.check_workers(decode_pool.default_workers())
