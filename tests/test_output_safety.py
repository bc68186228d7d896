"""Issue 14, items 1 and 7: no command destroys an input, and outputs are always valid and complete.

Every output is checked against every input, the model and the other outputs (symlinks, hard links and
other spellings included) before anything loads or is written; files are written aside and renamed into
place; records are valid JSON/CSV whatever the file names and the model's scores; Ctrl-C exits 130 with
only complete records; a Triton repository replaces only directories it wrote.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cmdcl.cli.errors import Terminated
from cmdcl.output_files import OutputError, atomic_write, check_outputs, same_file
from cmdcl.runtime.output import NON_FINITE_ERROR, RecordWriter, partial_path
from conftest import default_sigint
from test_runtime import tiny_checkpoint, videos  # noqa: F401  (fixtures)

NO_MODEL = "no-such-model.onnx"  # a run that got as far as loading the model would fail on it instead


def invoke(main, args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, code, *fragments):
    """The command failed with `code` and exactly one stderr line holding every fragment."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def strict_json(text):
    """json.loads that refuses NaN/Infinity, which are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))


# ---- the shared helpers ---------------------------------------------------------------------------
def test_same_file_sees_links_and_other_spellings(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"video")
    (tmp_path / "link.mp4").symlink_to(target)
    os.link(target, tmp_path / "hard.mp4")
    monkeypatch.chdir(tmp_path)
    assert same_file("link.mp4", target) and same_file(tmp_path / "hard.mp4", target)
    assert same_file("./sub/../v.mp4", target) and same_file(tmp_path / "new.txt", "new.txt")  # not there yet: by path
    assert not same_file("other.mp4", target)


def test_check_outputs_names_the_clash_and_unwritable_places(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"video")
    with pytest.raises(OutputError, match=r"--output .*v.mp4 is the input .*v.mp4: refusing to overwrite it"):
        check_outputs([("--output", video)], [("the input", video)])
    with pytest.raises(OutputError, match="--plot .*x.png and --output .*x.png are the same file"):
        check_outputs([("--output", tmp_path / "x.png"), ("--plot", tmp_path / "x.png")])
    with pytest.raises(OutputError, match="directory .*missing does not exist"):
        check_outputs([("--output", tmp_path / "missing" / "o.jsonl")])
    with pytest.raises(OutputError, match="is a directory"):
        check_outputs([("--output", tmp_path)])
    with pytest.raises(OutputError, match="cannot write in /proc"):  # read-only even for root
        check_outputs([("--output", "/proc/cmdcl-out.jsonl")])
    check_outputs([("--output", tmp_path / "o.jsonl"), ("--plot", None)], [("the input", "rtsp://127.0.0.1/cam")])


def test_atomic_write_replaces_only_when_complete_and_keeps_the_mode(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old")
    out.chmod(0o640)
    with pytest.raises(RuntimeError), atomic_write(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    with atomic_write(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".json"
        tmp.write_text("new")
    assert out.read_text() == "new" and out.stat().st_mode & 0o777 == 0o640 and os.listdir(tmp_path) == ["report.json"]


# ---- the record writer ----------------------------------------------------------------------------
BAD_NAME = os.fsdecode(b"caf\xe9-\xff.mp4")  # Latin-1 bytes: not UTF-8, so Python holds surrogate escapes
RECORDS = [
    {"video": BAD_NAME, "start": 0.0, "end": 2.0, "top": [{"label": "make tea", "score": 0.75}], "window": 0},
    {"video": "nan.mp4", "start": 0.0, "end": 2.0, "top": [{"label": "make tea", "score": float("nan")}], "window": 0},
    {"video": BAD_NAME, "summary": True, "mode": "video", "start": 0.0, "end": float("inf"), "top": []},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_records_are_valid_utf8_json_and_csv_whatever_the_names_and_scores(tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    with RecordWriter(out, fmt) as writer:
        for record in RECORDS:
            writer.write(record)
        assert writer.records == ([] if fmt != "json" else writer.records)  # only JSON holds records in memory
        assert partial_path(out).exists() and not out.exists()  # written aside until the run ends
    text = out.read_bytes().decode("utf-8")  # strict: raises on any byte that is not UTF-8
    assert not partial_path(out).exists()
    if fmt == "csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert [r["video"] for r in rows] == ["caf\\xe9-\\xff.mp4", "nan.mp4", "caf\\xe9-\\xff.mp4"]
        assert rows[0]["score"] == "0.75" and rows[1]["error"] == NON_FINITE_ERROR and rows[2]["end"] == ""
        return
    records = [strict_json(line) for line in text.splitlines()] if fmt == "jsonl" else strict_json(text)
    assert records[0]["video"] == "caf\\xe9-\\xff.mp4" and records[0]["top"][0]["score"] == 0.75
    assert records[1]["top"] == [] and records[1]["error"] == NON_FINITE_ERROR  # a NaN score is an error record
    assert records[2]["end"] is None


def test_jsonl_and_csv_records_are_not_kept_in_memory(tmp_path):
    for fmt in ("jsonl", "csv"):
        with RecordWriter(tmp_path / f"o.{fmt}", fmt) as writer:
            for i in range(1000):
                writer.write({"video": "v.mp4", "start": float(i), "end": i + 2.0, "top": [], "window": i})
            assert writer.records == []


def test_record_writer_keeps_an_interrupted_runs_partial_file_and_never_overwrites_it(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"old": true}\n')
    with pytest.raises(RuntimeError), RecordWriter(out) as writer:
        writer.write(RECORDS[0])
        raise RuntimeError("the model failed half-way")
    assert out.read_text() == '{"old": true}\n'  # an older output stays until a run finishes
    assert strict_json(partial_path(out).read_text())["window"] == 0
    with pytest.raises(OutputError, match=r"out.jsonl.partial: exists .*move it away or delete it"):
        RecordWriter(out)
    assert strict_json(partial_path(out).read_text())["window"] == 0
    partial_path(out).unlink()
    with pytest.raises(KeyboardInterrupt), RecordWriter(out):  # Ctrl-C before any record: the older output stays
        raise KeyboardInterrupt
    assert out.read_text() == '{"old": true}\n' and not partial_path(out).exists()
    with pytest.raises(KeyboardInterrupt), RecordWriter(out) as writer:  # Ctrl-C: the records so far are the output
        writer.write(RECORDS[0])
        raise KeyboardInterrupt
    assert strict_json(out.read_text())["window"] == 0 and not partial_path(out).exists()


def test_record_writer_that_cannot_start_leaves_no_partial_file(tmp_path):
    """A CSV header that does not fit (a full disk; here a file size limit of 0) is one OutputError, and the empty
    .partial file goes with it: it used to stay, and every later run refused it as "an interrupted run's records".
    Records on a stdout that is closed are one OutputError too (it was an unexpected AttributeError)."""
    out = tmp_path / "out.csv"
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
              "from cmdcl.runtime.output import RecordWriter\n"
              "RecordWriter(sys.argv[1] or None, sys.argv[2])\n")
    full = subprocess.run([sys.executable, "-c", script, str(out), "csv"], capture_output=True, text=True, timeout=60)
    assert full.stderr.splitlines()[-1].endswith("out.csv: cannot write the records: File too large")
    assert not partial_path(out).exists() and not out.exists()
    closed = subprocess.run([sys.executable, "-c", script, "", "jsonl"], stderr=subprocess.PIPE, text=True, timeout=60,
                            preexec_fn=lambda: os.close(1))  # no stdout at all (`>&-`): sys.stdout is None
    assert "OutputError: stdout: " in closed.stderr.splitlines()[-1], closed.stderr


def test_symlinked_and_pipe_outputs_are_written_through_not_replaced(tmp_path):
    """`-o latest.jsonl` (a link to runs/a.jsonl) keeps the link; `-o /dev/null` or a named pipe is never replaced."""
    import stat
    import threading

    target = tmp_path / "runs" / "a.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    with RecordWriter(link) as writer:
        writer.write(RECORDS[0])
    assert link.is_symlink() and strict_json(target.read_text())["window"] == 0
    with atomic_write(link) as tmp:
        tmp.write_text("plot")
    assert link.is_symlink() and target.read_text() == "plot"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    with RecordWriter(pipe) as writer:
        writer.write(RECORDS[0])
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and strict_json(received[0].decode())["window"] == 0
    with atomic_write(pipe) as tmp:
        assert tmp == pipe


# ---- cmdcl-run --------------------------------------------------------------------------------------
def test_run_refuses_outputs_that_are_inputs_the_model_or_each_other(tiny_checkpoint, videos, tmp_path, monkeypatch):  # noqa: F811
    from cmdcl.cli.run import main

    video = tmp_path / "v.mp4"
    video.write_bytes(videos[0].read_bytes())
    model = tmp_path / "m.pt"
    model.write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "link.jsonl").symlink_to(video)
    os.link(model, tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    stream = ["--mode", "stream"]
    cases = [
        ([video, "--output", video], "--output"),
        ([video, "--overlay", video], "--overlay"),
        ([video, *stream, "--plot", video], "--plot"),
        ([video, "--output", "link.jsonl"], "is the input"),  # a symlink to the input
        ([video, "--engine", model, "--output", "hard.jsonl"], "is the --engine model"),  # a hard link of the model
        ([video, "--engine", model, "--output", model], "is the --engine model"),
        ([video, "--engine", tmp_path / "m.onnx", "--output", tmp_path / "m.head.onnx"], "is the --engine model's head graph"),
        ([tmp_path / "v.mp4", "--output", "./sub/../v.mp4"], "is the input"),  # absolute input, relative output
        ([video, *stream, "--output", "x.png", "--plot", "x.png"], "are the same file"),
        ([video, "--output", "o.mp4", "--overlay", "o.mp4"], "are the same file"),
    ]
    before = {p: p.read_bytes() for p in (video, model)}
    for args, fragment in cases:
        line = one_line(invoke(main, [*args, *(["--engine", NO_MODEL] if "--engine" not in args else [])]), 1, fragment)
        assert NO_MODEL not in line  # refused before the model was loaded
        assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["hard.jsonl", "link.jsonl", "m.pt", "v.mp4"]  # nothing written


def test_run_checks_the_output_can_be_written_before_the_model_loads(videos, tmp_path):  # noqa: F811
    from cmdcl.cli.run import main

    for output, fragment in [(tmp_path / "missing" / "o.jsonl", "does not exist"), (tmp_path, "is a directory"),
                             ("/proc/cmdcl-out.jsonl", "cannot write in /proc")]:
        one_line(invoke(main, [videos[0], "--engine", NO_MODEL, "--output", output]), 1, fragment)
    partial_path(tmp_path / "o.jsonl").write_text("{}\n")
    one_line(invoke(main, [videos[0], "--engine", NO_MODEL, "--output", tmp_path / "o.jsonl"]), 1, "o.jsonl.partial: exists")
    assert partial_path(tmp_path / "o.jsonl").read_text() == "{}\n"


def test_run_model_that_fails_to_load_leaves_no_partial_file(videos, tmp_path):  # noqa: F811
    from cmdcl.cli.run import main

    one_line(invoke(main, [videos[0], "--engine", NO_MODEL, "--output", tmp_path / "o.jsonl"]), 1, "no such file")
    assert os.listdir(tmp_path) == []


def test_run_csv_with_a_non_utf8_file_name(tiny_checkpoint, videos, tmp_path):  # noqa: F811
    from cmdcl.cli.run import main

    bad = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.mp4"))
    bad.write_bytes(videos[0].read_bytes())
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"out.{fmt}"
        result = invoke(main, [bad, videos[1], "--engine", tiny_checkpoint, "--output", out])
        assert result.exit_code == 0, result.output
        text = out.read_bytes().decode("utf-8")
        names = ([r["video"] for r in csv.DictReader(text.splitlines())] if fmt == "csv"
                 else [strict_json(line)["video"] for line in text.splitlines()])
        assert names[0] == f"{tmp_path}/caf\\xe9.mp4" and names[-1] == str(videos[1])  # the rows after it are there too


def test_run_model_giving_nan_writes_error_records_and_exits_3(tiny_checkpoint, videos, tmp_path, monkeypatch):  # noqa: F811
    from cmdcl.cli.run import main
    from cmdcl.runtime.backends import Backend

    monkeypatch.setattr(Backend, "probabilities", lambda self, logits: np.full(np.shape(logits), np.nan))
    out = tmp_path / "out.jsonl"
    result = invoke(main, [videos[0], "--engine", tiny_checkpoint, "--mode", "stream", "--output", out])
    assert result.exit_code == 3, result.output
    records = [strict_json(line) for line in out.read_text().splitlines()]
    assert records and all(r["error"] == NON_FINITE_ERROR and r["top"] == [] for r in records)
    assert f"cmdcl-run: {videos[0]}: {NON_FINITE_ERROR}" in result.stderr


def run_in_subprocess(args, **kwargs):
    script = "from cmdcl.cli.run import main; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, preexec_fn=default_sigint, **kwargs)


def wait_for_lines(path, count, process, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None and (not path.exists() or path.read_text().count("\n") < count):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"


@pytest.mark.parametrize("sig, status, stopped", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_ends_the_run_and_the_records_so_far_are_the_output(sig, status, stopped, tiny_checkpoint, videos,  # noqa: F811
                                                                              tmp_path):
    out = tmp_path / "out.jsonl"
    args = [*videos * 30, "--engine", tiny_checkpoint, "--mode", "stream", "--window", "2", "--stride", "0.5", "-o", out, "-q"]
    process = run_in_subprocess(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_lines(partial_path(out), 3, process)  # tail-able while the run goes
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert stderr.decode().strip().splitlines() == [f"cmdcl-run: {stopped}; the records so far are in {out}"]
    lines = out.read_text().splitlines()
    assert len(lines) >= 3 and all(isinstance(strict_json(line), dict) for line in lines)
    assert not partial_path(out).exists()


@pytest.mark.parametrize("stop, status, stopped", [(KeyboardInterrupt, 130, "interrupted"),
                                                   (Terminated, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_while_the_inputs_are_listed_is_the_documented_status(stop, status, stopped, monkeypatch):
    """Listing a large directory takes a while; a Ctrl-C or SIGTERM then was click's "Aborted!", status 1."""
    import cmdcl.runtime.recognizer as recognizer
    from cmdcl.cli.run import main

    def listing_stopped(inputs):
        raise stop

    monkeypatch.setattr(recognizer, "expand_inputs", listing_stopped)
    result = invoke(main, ["videos/"])
    assert result.exit_code == status and result.stderr.strip() == f"cmdcl-run: {stopped}"


def test_a_failing_record_write_is_one_line(videos, tiny_checkpoint):  # noqa: F811
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as on a full disk
        process = run_in_subprocess([videos[0], "--engine", tiny_checkpoint], stdout=full, stderr=subprocess.PIPE)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.decode().strip().splitlines() == ["cmdcl-run: error: stdout: cannot write the records: No space left on device"]


# ---- cmdcl-export and the Triton repository -------------------------------------------------------------
@pytest.fixture
def checkpoint(make_model, tmp_path):
    from cmdcl.model import save_checkpoint

    return save_checkpoint(make_model(num_classes=3), tmp_path / "m.pt")


def test_export_refuses_outputs_that_are_its_inputs_or_each_other(checkpoint, tmp_path):
    from cmdcl.cli.export import main

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"a video")
    os.link(checkpoint, tmp_path / "hard.onnx")
    cases = [
        (["--out", checkpoint], "--out", "is --ckpt"),
        (["--out", tmp_path / "hard.onnx"], "is --ckpt"),  # a hard link of the checkpoint
        (["--out", tmp_path / "clip.onnx", "--video", video, "--engine", video], "--engine", "is --video"),
        (["--out", tmp_path / "x.onnx", "--timing-cache", checkpoint], "--timing-cache", "is --ckpt"),
        (["--out", tmp_path / "x.onnx", "--engine", tmp_path / "x.head.onnx"], "--out's head graph", "are the same file"),
        (["--out", tmp_path / "m.frame_encoder.onnx", "--engine", tmp_path / "m.frame_encoder.onnx"], "are the same file"),
        (["--out", tmp_path / "x.onnx", "--engine", tmp_path / "e.plan", "--timing-cache", tmp_path / "e.head.plan"], "are the same file"),
    ]
    before = {p: p.read_bytes() for p in (checkpoint, video)}
    for args, *fragments in cases:
        one_line(invoke(main, ["--ckpt", checkpoint, "--no-verify", *args]), 1, "cmdcl-export: error: ", *fragments)
        assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "hard.onnx", "m.pt"]


def test_no_split_export_removes_an_older_exports_split_graphs(checkpoint, tmp_path):
    from cmdcl.cli.export import main

    result = invoke(main, ["--ckpt", checkpoint, "--no-verify"])
    assert result.exit_code == 0 and (tmp_path / "m.head.onnx").exists()
    result = invoke(main, ["--ckpt", checkpoint, "--no-verify", "--no-split"])
    assert result.exit_code == 0, result.output
    assert f"removed {tmp_path / 'm.head.onnx'}" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]
    (tmp_path / "m.head.onnx").write_text("a user's file that only has the name")
    one_line(invoke(main, ["--ckpt", checkpoint, "--no-verify", "--no-split"]), 1, "m.head.onnx: exists and is not a CMDCL graph")
    assert (tmp_path / "m.head.onnx").read_text() == "a user's file that only has the name"


def test_failed_verification_leaves_an_older_export_as_it_was(checkpoint, tmp_path, monkeypatch):
    from cmdcl.cli.export import main
    from cmdcl.export import verify

    assert invoke(main, ["--ckpt", checkpoint, "--no-verify"]).exit_code == 0
    older = {p.name: p.read_bytes() for p in tmp_path.glob("*.onnx")}
    monkeypatch.setitem(verify.TOLERANCES, "fp32", 0.0)  # fp32 ONNX Runtime is ~1e-7 off PyTorch, never 0
    one_line(invoke(main, ["--ckpt", checkpoint, "--opset", "17"]), 1, "disagree with PyTorch", "nothing written")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.onnx")} == older and len(older) == 3
    assert sorted(os.listdir(tmp_path)) == ["m.frame_encoder.onnx", "m.head.onnx", "m.onnx", "m.pt"]  # no temporary left


def test_export_to_a_device_or_pipe_writes_into_it_and_never_replaces_it(checkpoint, tmp_path):
    """`--out /dev/null` once replaced the device node with the ONNX file (as root); a FIFO stands in for it here."""
    import stat
    import threading

    import onnx

    from cmdcl.cli.export import main

    pipe = tmp_path / "pipe.onnx"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    result = invoke(main, ["--ckpt", checkpoint, "--out", pipe, "--no-split", "--no-verify"])
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert onnx.load_from_string(received[0]).graph.output[0].name == "logits"  # the whole graph came through the pipe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from serve_helpers import export_small_model

    return export_small_model(tmp_path_factory.mktemp("model"))


def test_triton_repo_never_replaces_a_directory_it_did_not_write(exported, tmp_path):
    """`--triton-repo .` in a checkout of this project once deleted the package source `cmdcl/`."""
    from cmdcl.serve.triton_repo import TritonRepoError, write_triton_repo

    package = tmp_path / "cmdcl"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("# the user's package\n")
    (package / "config.pbtxt").write_text('name: "cmdcl"\n')  # even a Triton config, when not ours
    with pytest.raises(TritonRepoError, match=r"cmdcl: exists and was not written by cmdcl-export"):
        write_triton_repo(exported["full"], tmp_path)
    assert sorted(p.name for p in package.rglob("*")) == ["__init__.py", "cli", "config.pbtxt"]
    assert sorted(os.listdir(tmp_path)) == ["cmdcl"]  # nothing else written, no temporary left


def test_triton_repo_is_swapped_in_and_keeps_everything_else(exported, tmp_path):
    from cmdcl.serve.triton_repo import MARKER, write_triton_repo

    repo = tmp_path / "repo"
    write_triton_repo(exported["full"], repo, max_batch=2)
    (repo / "head" / "stale.txt").write_text("from the older repository")
    (repo / "other_model").mkdir()
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    written = write_triton_repo(exported["full"], repo, max_batch=4)
    assert all(path.read_text().splitlines()[0] == MARKER for path in written)
    assert "max_batch_size: 4" in (repo / "head" / "config.pbtxt").read_text()
    assert not (repo / "head" / "stale.txt").exists()  # our model directory was replaced whole
    assert (repo / "other_model" / "config.pbtxt").read_text() == 'name: "other_model"\n'
    assert sorted(os.listdir(tmp_path)) == ["repo"]  # the staging directory is gone


def test_export_refuses_files_inside_the_model_directories_it_would_replace(exported, tmp_path):
    from cmdcl.cli.export import main
    from cmdcl.serve.triton_repo import write_triton_repo

    repo = tmp_path / "repo"
    write_triton_repo(exported["full"], repo)
    ckpt = exported["full"].with_suffix(".pt")
    out = repo / "head" / "mine.onnx"
    one_line(invoke(main, ["--ckpt", ckpt, "--out", out, "--no-verify", "--triton-repo", repo]), 1,
             f"--out {out} lies in {repo / 'head'}, which writing the repository replaces")
    assert not out.exists()
    result = invoke(main, ["--ckpt", ckpt, "--out", repo / "mine.onnx", "--no-verify", "--triton-repo", repo])
    assert result.exit_code == 0, result.output  # beside the model directories is fine, and kept
    assert (repo / "mine.onnx").exists() and (repo / "mine.head.onnx").exists()


# ---- the other commands -----------------------------------------------------------------------------------
def test_build_refuses_an_engine_over_its_model_before_needing_tensorrt(exported, tmp_path):
    from cmdcl.cli.build import main

    model = tmp_path / "m.onnx"
    model.write_bytes(exported["full"].read_bytes())
    one_line(invoke(main, [model, "--engine", model, "--no-split"]), 1, f"--engine {model} is the model {model}")
    one_line(invoke(main, [model, "--engine", tmp_path / "e.plan", "--timing-cache", tmp_path / "e.plan.json"]), 1,
             "are the same file")
    assert model.read_bytes() == exported["full"].read_bytes()


def test_bench_refuses_an_output_over_its_inputs_before_measuring(exported, tmp_path):
    from cmdcl.cli.bench import main

    one_line(invoke(main, ["--engine", exported["full"], "--json", exported["full"]]), 1, "--json", "is the --engine model")
    one_line(invoke(main, ["--plot", tmp_path / "r.png", "--markdown", tmp_path / "r.png"]), 1, "are the same file")


def test_synth_never_overwrites_a_folder_it_did_not_write(tmp_path):
    from cmdcl.cli.synth import main

    (tmp_path / "manifest.csv").write_text("path,label\nmine.mp4,mine\n")
    one_line(invoke(main, ["--out", tmp_path, "--videos", "1", "--size", "16"]), 1, "manifest.csv, which is not from cmdcl-synth")
    assert (tmp_path / "manifest.csv").read_text() == "path,label\nmine.mp4,mine\n"
    fresh = tmp_path / "fresh"
    for _ in range(2):  # its own earlier output may be written again
        assert invoke(main, ["--out", fresh, "--videos", "1", "--size", "16"]).exit_code == 0


def test_train_refuses_a_checkpoint_over_its_data(tmp_path):
    from cmdcl.cli.train import main

    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\nv.mp4,a\n")
    one_line(invoke(main, ["--data", manifest, "--out", manifest]), 1, "--out", "is --data")
    classes = tmp_path / "m.pt.resume"
    classes.write_text("a\n")
    one_line(invoke(main, ["--data", manifest, "--out", tmp_path / "m.pt", "--classes", classes]), 1,
             "--out's resume state", "is --classes")
    assert manifest.read_text() == "path,label\nv.mp4,a\n" and classes.read_text() == "a\n"


# ---- every command, every output (issue 21, item 2) ------------------------------------------------------------
# Each output option of each console script, pointed at each file the command reads (inputs, the model with its split
# graphs and sidecars, the checkpoint), at another output, at a file in cmdcl's own folders, and at a symlink to any of
# them, must be refused before anything loads, with one line, leaving every file as it was. The inputs are a few bytes
# each: a command that read them before refusing would fail on them instead.
ROOT = Path(__file__).resolve().parents[1]
OUTPUT_WORDS = {"out", "output", "json", "plot", "markdown", "overlay", "csv", "png", "report", "save", "dump", "cache",
                "repo", "log", "engine", "dir", "file", "path", "dest"}  # a text parameter named with one of these may be an output
INPUTS = {  # the path-like parameters that each command only reads
    "cmdcl-run": {"engine"}, "cmdcl-eval": {"ckpt", "probe_labels"}, "cmdcl-bench": {"engines", "video", "long_video"},
    "cmdcl-export": {"ckpt", "video"}, "cmdcl-build": {"onnx_path"}, "cmdcl-train": {"clip_weights", "classes"},
    "cmdcl-serve": {"engine"}, "cmdcl-client classify": {"videos"}, "cmdcl-client load-test": {"videos", "engine"},
}
ENGINE = ["models/v1.plan", "models/v1.frame_encoder.plan", "models/v1.head.plan"]
ENGINE += [f"{path}.json" for path in ENGINE]  # each engine's sidecar
ONNX = ["models/m.onnx", "models/m.frame_encoder.onnx", "models/m.head.onnx"]
# (command, arguments (a required output among them is given again by the case), what it reads with them, the
# output options walked: None for all of them); latest.plan -> models/v1.plan and latest.onnx -> models/m.onnx
SCENARIOS = [
    ("cmdcl-run", ["in.mp4", "--engine", "latest.plan", "--mode", "stream"], ["in.mp4", "latest.plan", *ENGINE], None),
    ("cmdcl-run", ["in.mp4", "--engine", "models/m.onnx", "--mode", "stream"], ["in.mp4", *ONNX], None),
    ("cmdcl-run", ["in.mp4", "--engine", "ckpt.pt"], ["in.mp4", "ckpt.pt"], ["--output", "--overlay"]),
    ("cmdcl-run", ["in.mp4"], ["in.mp4"], ["--output", "--overlay"]),  # the demo model: in cmdcl's cache (CMDCL_FILES)
    ("cmdcl-eval", ["--ckpt", "latest.plan", "--data", "train.csv", "--mode", "stream"], ["train.csv", "latest.plan", *ENGINE],
     ["--json"]),
    ("cmdcl-eval", ["--ckpt", "ckpt.pt", "--data", "train.csv", "--interventions", "--probe-labels", "probe.csv"],
     ["ckpt.pt", "train.csv", "probe.csv"], None),
    ("cmdcl-bench", ["--engine", "latest.onnx", "--engine", "models/v1.plan", "--video", "in.mp4", "--long-video", "long.mp4",
                     "--stages", "head", "--iters", "1", "--warmup", "0", "-q"],
     ["latest.onnx", *ONNX, *ENGINE, "in.mp4", "long.mp4"], None),
    ("cmdcl-export", ["--ckpt", "ckpt.pt", "--video", "in.mp4", "--no-verify"], ["ckpt.pt", "in.mp4"], None),
    ("cmdcl-build", ["latest.onnx"], ["latest.onnx", *ONNX], None),
    ("cmdcl-train", ["--data", "train.csv", "--val", "val.csv", "--classes", "classes.txt", "--clip-weights", "clip.pt",
                     "--batch-size", "1", "--out", "model.pt"],
     ["train.csv", "val.csv", "classes.txt", "clip.pt", "in.mp4"], None),  # in.mp4: the manifests' video
    ("cmdcl-synth", ["--videos", "1", "--size", "16"], [], None),
    ("cmdcl-mini-vlm", ["--pairs", "2", "--heldout", "2", "--epochs", "1", "--batch-size", "2", "--out", "vlm.pt"], [], None),
]
CMDCL_FILES = ["xdg/cmdcl/demo-0123456789abcdef/model.head.onnx", "xdg/cmdcl/bench/testsrc2.mp4",  # the cache
               "assets/cmdcl_tiny_synth.pt"]  # the bundled assets (cmdcl.assets.ASSETS, moved here)
REFUSED = re.compile(r"refusing to overwrite it|are the same file|refusing to write there|is a file")


def console_commands():
    """(name, click command) of every console script in setup.py; a group's subcommands each on their own."""
    import importlib

    import click

    for script, module, attr in re.findall(r'"(cmdcl-[\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text()):
        command = getattr(importlib.import_module(module), attr)
        if isinstance(command, click.Group):
            yield from ((f"{script} {name}", sub) for name, sub in command.commands.items())
        else:
            yield script, command


def output_params(command):
    from cmdcl.cli.options import OutputPath

    return [param for param in command.params if isinstance(param.type, OutputPath)]


def test_every_path_or_output_like_option_is_a_declared_output_or_a_known_input():
    import click

    commands = dict(console_commands())
    assert set(INPUTS) <= set(commands)
    for name, command in commands.items():
        outputs = output_params(command)
        for param in command.params:
            looks_like_a_path = isinstance(param.type, click.Path) or (isinstance(param.type, click.types.StringParamType)
                                                                       and OUTPUT_WORDS & set(param.name.split("_")))
            if param in outputs or not looks_like_a_path or param.name in INPUTS.get(name, ()):
                continue
            pytest.fail(f"{name} {param.opts[0]}: an output? Give it type=OutputPath and pass it to check_outputs; "
                        f"an input? List it in INPUTS (and in a scenario's inputs)")
        assert INPUTS.get(name, set()) <= {param.name for param in command.params}, name
        walked = {option for command, _, _, options in SCENARIOS if command == name
                  for option in options or [param.opts[0] for param in outputs]}
        assert walked == {param.opts[0] for param in outputs}, f"{name}: walk each output option in a SCENARIOS entry"


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Every file the scenarios read, a few bytes each, with latest.* symlinks to the models; cmdcl's cache and
    bundled assets moved into tmp_path. Returns a snapshot function of everything under tmp_path."""
    import cmdcl.assets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cmdcl.assets, "ASSETS", tmp_path / "assets")
    contents = {"train.csv": "path,label\nin.mp4,a\n", "val.csv": "path,label\nin.mp4,a\n", "classes.txt": "a\n",
                "probe.csv": "video,label\nin.mp4,x\n"}
    for name in {path for _, _, inputs, _ in SCENARIOS for path in inputs if not path.startswith("latest")} | set(CMDCL_FILES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(contents.get(name, f"the bytes of {name}\n"))
    Path("latest.plan").symlink_to("models/v1.plan")
    Path("latest.onnx").symlink_to("models/m.onnx")

    def snapshot():
        return {path: os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
                for path in sorted(tmp_path.rglob("*"))}

    return snapshot


def walk_cases(args, inputs, outputs):
    """(arguments, what they try[, (a symlink to make, its target)]) for each output option in `outputs` after `args`."""
    for i, option in enumerate(outputs):
        for n, target in enumerate([*inputs, *CMDCL_FILES]):
            yield [*args, option, target], f"{option} at {target}"
            link = f"link{i}-{n}{Path(target).suffix}"
            yield [*args, option, link], f"{option} at {link} -> {target}", (link, target)
        for other in outputs[i + 1:]:
            yield [*args, option, "new.out", other, "new.out"], f"{option} and {other} at one new file"


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=[f"{s[0]}-{i}" for i, s in enumerate(SCENARIOS)])
def test_no_output_of_any_command_overwrites_what_it_reads(index, world):
    name, scenario_args, inputs, outputs = SCENARIOS[index]
    command = dict(console_commands())[name]
    for args, tried, *link in walk_cases(scenario_args, inputs, outputs or [param.opts[0] for param in output_params(command)]):
        if link:  # made per case: a link left from an earlier case would be one more file it might not overwrite
            Path(link[0][0]).symlink_to(link[0][1])
        before = world()
        result = CliRunner().invoke(command, args)
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, f"{name} {tried}: {result.output}"
        lines = result.stderr.strip().splitlines()
        if result.exit_code == 1:  # the clash check: one line
            assert len(lines) == 1 and lines[0].startswith(f"{name.split()[0]}: error: "), f"{name} {tried}: {result.stderr}"
        assert REFUSED.search(lines[-1]), f"{name} {tried}: {result.stderr}"  # exit 2: click's own check of a folder
        assert world() == before, f"{name} {tried} changed files"
        if link:
            Path(link[0][0]).unlink()


def test_a_symlinked_model_runs_with_the_split_graphs_of_the_file_it_points_to(exported, tmp_path):
    """`latest.onnx -> models/m.onnx`: stream mode reads models/m.*.onnx (what the clash checks protect), not latest.*.onnx."""
    from cmdcl.runtime import load_backend

    models = tmp_path / "models"
    models.mkdir()
    for path in exported.values():
        (models / path.name.replace("model", "m", 1)).write_bytes(path.read_bytes())
    link = tmp_path / "latest.onnx"
    link.symlink_to("models/m.onnx")
    frames = np.zeros((1, 4, 32, 32, 3), np.uint8)
    with load_backend(link) as backend:
        tokens = backend.encode_frames(frames[0])
        np.testing.assert_allclose(backend.classify_tokens(tokens[None]), backend.classify_clips(frames), rtol=1e-4, atol=1e-5)


def test_model_files_are_those_of_a_symlinks_target(tmp_path):
    from cmdcl.artifacts import model_files

    (tmp_path / "latest.plan").symlink_to("models/v1.plan")
    (tmp_path / "latest.onnx").symlink_to("models/m.onnx")
    models = tmp_path / "models"
    assert model_files(tmp_path / "latest.onnx", "the model") == [
        ("the model", tmp_path / "latest.onnx"), ("the model's frame_encoder graph", models / "m.frame_encoder.onnx"),
        ("the model's head graph", models / "m.head.onnx")]
    assert [path.name for _, path in model_files(tmp_path / "latest.plan", "the model")] == [
        "latest.plan", "v1.frame_encoder.plan", "v1.head.plan", "v1.plan.json", "v1.frame_encoder.plan.json", "v1.head.plan.json"]
    assert model_files(tmp_path / "m.pt", "--ckpt") == [("--ckpt", tmp_path / "m.pt")]  # a checkpoint is the whole model


# ---- the demo model's cache ---------------------------------------------------------------------------------
@pytest.fixture
def demo_cache(make_model, tmp_path, monkeypatch):
    """cmdcl's cache in tmp_path, and a small model standing in for the bundled demo checkpoint (it exports in seconds)."""
    import cmdcl.assets
    from cmdcl.model import save_checkpoint

    checkpoint = save_checkpoint(make_model(num_classes=3), tmp_path / "demo.pt")
    monkeypatch.setattr(cmdcl.assets, "demo_checkpoint", lambda: checkpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "cmdcl"


def test_the_demo_cache_checks_itself_and_is_exported_again_when_damaged_or_stale(demo_cache):
    from cmdcl import __version__
    from cmdcl.artifacts import graph_path
    from cmdcl.runtime.backends import DEMO_RECORD, demo_engine, load_backend

    model = demo_engine()
    frames = np.random.default_rng(0).integers(0, 256, (1, 4, 32, 32, 3), np.uint8)
    with load_backend() as backend:
        expected = backend.classify_clips(frames)
    record = model.parent / DEMO_RECORD
    damages = [lambda: model.write_text('{"video": "v.mp4"}\n'),  # what `cmdcl-run -o` once wrote there
               lambda: graph_path(model, "head").unlink(),
               lambda: graph_path(model, "frame_encoder").write_bytes(b""),
               lambda: record.write_text(record.read_text().replace(__version__, "0.0.0")),  # exported by another version
               lambda: record.unlink()]  # a cache from before the record
    for damage in damages:
        damage()
        with load_backend() as backend:  # exports it again (demo_engine), then reads every graph
            tokens = backend.encode_frames(frames[0])
            np.testing.assert_allclose(backend.classify_tokens(tokens[None]), expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(backend.classify_clips(frames), expected, rtol=1e-4, atol=1e-5)
        assert json.loads(record.read_text())["cmdcl"] == __version__
    assert sorted(os.listdir(demo_cache)) == [model.parent.name, model.parent.name + ".lock"]  # nothing left aside


def test_the_demo_cache_is_checked_and_exported_under_a_lock(demo_cache, monkeypatch):
    """Two first runs at once: the second waits for the first's export instead of exporting over it."""
    import fcntl

    from cmdcl import export
    from cmdcl.runtime.backends import demo_engine

    held = []
    export_onnx = export.export_onnx

    def export_while_checking_the_lock(*args, **kwargs):
        (lock,) = demo_cache.glob("*.lock")
        with open(lock) as other:  # another process's try
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.name)
        return export_onnx(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", export_while_checking_the_lock)
    model = demo_engine()
    assert held == [f"{model.parent.name}.lock"]
    assert demo_engine() == model and held == [f"{model.parent.name}.lock"]  # intact: not exported again
