"""One error root (cmdcl.errors.CmdclError), one first_line, one exit-code table for every command."""

from __future__ import annotations

import ast
import builtins
import importlib
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cmdcl.cli.errors import Terminated, cli_errors
from cmdcl.errors import CmdclError, ExitCode, describe, first_line

PACKAGE = Path(__file__).resolve().parents[1] / "cmdcl"

# Every error class the package raises on purpose, with the base it had before CmdclError: `except ValueError` still catches it.
OLD_BASES = {
    "cmdcl.bench.stages.SkipStage": Exception,
    "cmdcl.data.manifest.ManifestError": ValueError,
    "cmdcl.data.video.VideoError": Exception,
    "cmdcl.export.metadata.ModelFileError": ValueError,
    "cmdcl.export.onnx_export.ExportError": RuntimeError,
    "cmdcl.export.tensorrt_build.EngineBuildError": RuntimeError,
    "cmdcl.export.trt_parser_check.TensorRTUnavailable": RuntimeError,
    "cmdcl.export.verify.VerificationError": RuntimeError,
    "cmdcl.kernels.aot.AotError": RuntimeError,
    "cmdcl.model.checkpoint.CheckpointError": ValueError,
    "cmdcl.model.clip.ClipWeightsError": ValueError,  # new with it
    "cmdcl.output_files.OutputError": ValueError,
    "cmdcl.runtime.backends.BackendError": Exception,
    "cmdcl.serve.server.RequestError": ValueError,
    "cmdcl.serve.server.ServerDied": RuntimeError,
    "cmdcl.serve.triton_repo.TritonRepoError": ValueError,
    "cmdcl.train.loop.ResumeError": ValueError,
    "cmdcl.train.loop.TrainingDiverged": Exception,  # new with it
}


@pytest.mark.parametrize("name, old_base", OLD_BASES.items())
def test_every_error_class_derives_from_cmdcl_error_and_keeps_its_old_base(name, old_base):
    module, cls = name.rsplit(".", 1)
    if module == "cmdcl.kernels.aot":
        pytest.importorskip("triton")
    error = getattr(importlib.import_module(module), cls)
    assert issubclass(error, CmdclError) and issubclass(error, old_base)


def _sources():
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_exception_class_outside_the_root():
    """Every public exception class in the package derives from CmdclError (private ones are control flow that
    never leaves their module; a KeyboardInterrupt stays one), and OLD_BASES above lists every such class."""
    bases = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = ([ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases], path)
    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)}

    def ancestors(name):
        found = set()
        for base in bases.get(name, ([], None))[0]:
            found |= {base, *ancestors(base)} if base != name else {base}
        return found

    exceptions = {name for name in bases if ancestors(name) & builtin and name != "CmdclError"}
    public = {name for name in exceptions if not name.startswith("_") and "KeyboardInterrupt" not in ancestors(name)}
    outside = sorted(f"{bases[name][1].relative_to(PACKAGE.parent)}: {name}" for name in public if "CmdclError" not in ancestors(name))
    assert not outside, outside
    assert public == {name.rsplit(".", 1)[-1] for name in OLD_BASES}, "list the new error class in OLD_BASES"


def test_only_the_cli_imports_the_cli():
    """Layers run downward: nothing below cmdcl.cli imports it (first_line and describe live in cmdcl.errors)."""
    upward = []
    for path, tree in _sources():
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module.startswith("cmdcl.cli"):
            continue
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names = [f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)]
                names += [f"{names[0]}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            upward += [f"{module} imports {name}" for name in names if name == "cmdcl.cli" or name.startswith("cmdcl.cli.")]
    assert not upward, upward


def test_the_error_module_is_light():
    """cmdcl.errors is imported by every layer, the bench's subprocesses included: no torch, click or numpy."""
    code = "import sys, cmdcl.errors; print(sorted(m for m in ('torch', 'click', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_first_line():
    assert first_line(ValueError("\n  bad file\nsecond line\n")) == "bad file"
    assert first_line(KeyError()) == "KeyError"  # an exception without a message: its type
    assert first_line(" text\nmore") == "text" and first_line("  \n") == ""  # text without a line: nothing
    assert first_line(OSError(2, "No such file or directory")) == "[Errno 2] No such file or directory"
    assert describe(ValueError("x"), (OSError, ValueError)) == "x"
    assert describe(TypeError("x"), ValueError) == "unexpected TypeError: x (rerun with --debug for the traceback)"


def test_the_exit_code_table():
    """The documented table (README "Exit status"): scripts depend on these numbers."""
    assert {code.name: int(code) for code in ExitCode} == {"OK": 0, "FAILED": 1, "USAGE": 2, "INPUTS_FAILED": 3,
                                                          "INTERRUPTED": 128 + signal.SIGINT, "TERMINATED": 128 + signal.SIGTERM}
    assert (ExitCode.INTERRUPTED, ExitCode.TERMINATED) == (130, 143)  # as a shell reports a process the signal ended


def _command(body):
    @click.command()
    @click.option("--debug", is_flag=True)
    def command(debug):
        with cli_errors("prog", debug, interrupted=lambda: "; the note"):
            body()

    return command


def _raise(exc):
    def body():
        raise exc

    return body


@pytest.mark.parametrize("exc, code, line", [
    (CmdclError("m.onnx: no such file\nmore"), ExitCode.FAILED, "prog: error: m.onnx: no such file"),
    (OSError("disk full"), ExitCode.FAILED, "prog: error: disk full"),
    (TypeError("a bug"), ExitCode.FAILED, "prog: error: unexpected TypeError: a bug (rerun with --debug for the traceback)"),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED, "prog: interrupted; the note"),
    (Terminated(), ExitCode.TERMINATED, "prog: terminated (SIGTERM); the note"),
])
def test_cli_errors_maps_each_failure_to_one_line_and_the_tables_code(exc, code, line):
    result = CliRunner().invoke(_command(_raise(exc)), [])
    assert (result.exit_code, result.stderr.splitlines()) == (code, [line])
    if not isinstance(exc, KeyboardInterrupt):  # --debug: the traceback first, the same line and exit status
        result = CliRunner().invoke(_command(_raise(exc)), ["--debug"])
        assert result.exit_code == code and "Traceback" in result.stderr and result.stderr.splitlines()[-1] == line


def test_click_usage_errors_pass_through_with_status_2():
    result = CliRunner().invoke(_command(_raise(click.UsageError("--a needs --b"))), [])
    assert result.exit_code == ExitCode.USAGE and "Error: --a needs --b" in result.stderr and "prog:" not in result.stderr


def one_line(result, code, fragment):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and fragment in lines[0], (result.exit_code, result.stderr)
    assert "Traceback" not in result.output


def test_each_command_exits_with_the_tables_code_and_one_line(tmp_path):
    from cmdcl.cli import bench, build, eval, export, run, serve, synth, train

    def invoke(main, *args):
        return CliRunner().invoke(main, [str(a) for a in args])

    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read: the clash is found first")
    one_line(invoke(build.main, model, "--engine", model, "--no-split"), ExitCode.FAILED,
             f"cmdcl-build: error: --engine {model} is the model")
    one_line(invoke(export.main, "--ckpt", tmp_path / "absent.pt", "--no-verify"), ExitCode.FAILED, "absent.pt: no such file")
    one_line(invoke(run.main, tmp_path / "v.mp4", "--engine", tmp_path / "none.onnx"), ExitCode.FAILED,
             f"cmdcl-run: error: {tmp_path / 'none.onnx'}: no such file")
    assert invoke(run.main, tmp_path / "v.mp4", "--top-k", "0").exit_code == ExitCode.USAGE
    one_line(invoke(train.main, "--data", tmp_path / "nowhere.csv", "--out", tmp_path / "x.pt"), ExitCode.FAILED,
             "cmdcl-train: error: ")
    one_line(invoke(eval.main, "--ckpt", tmp_path / "none.pt", "--data", tmp_path / "nowhere.csv"), ExitCode.FAILED,
             f"cmdcl-eval: error: {tmp_path / 'none.pt'}: no such file")
    one_line(invoke(synth.main, "--out", tmp_path / "s", "--videos", "1", "--size", "17"), ExitCode.FAILED, "size must be even")
    one_line(invoke(bench.main, "--plot", tmp_path / "r.png", "--markdown", tmp_path / "r.png", "-q"), ExitCode.FAILED,
             "cmdcl-bench: error: ")
    ports = invoke(serve.main, "--http-port", "8000", "--grpc-port", "8000")
    assert ports.exit_code == ExitCode.USAGE and "Error: --http-port, --grpc-port and --metrics-port must differ" in ports.stderr
    one_line(invoke(serve.main, "--engine", tmp_path / "absent.onnx"), ExitCode.FAILED, "cmdcl-serve: error: ")  # no PyTriton, or no file
    one_line(invoke(serve.client, "classify", tmp_path / "v.mp4", "--url", "127.0.0.1:9"), ExitCode.FAILED,
             "cmdcl-client: error: 127.0.0.1:9: ")  # no tritonclient here, or nothing listens on port 9
