"""Every option of every command is checked when the command line is parsed (issue 21, part 4).

The commands are the console scripts of setup.py and their options are found by introspection, so that an option
added later is tested too: each numeric or choice option gets absurd values (0, negative, NaN, infinities, 1e308,
huge integers, empty text, empty list items) and must refuse each one with click's usage error (exit status 2, one
`Error:` line naming the option), unless ZERO_MEANS documents what 0 means for it. An accepted value must be
accepted because it is valid: the command then runs on inputs that do not exist and must fail on them (exit 1),
fast, before any real work. A text option must be listed in FREE_TEXT with the reason it takes any text.
"""

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cmdcl.cli.options import CommaList, TorchDevice

ROOT = Path(__file__).resolve().parents[1]
ABSURD = ["0", "-1", "nan", "inf", "-inf", "1e308", "99999999999999999999", "", "1,,2"]
ABSURD_CHOICES = ["", "bogus", "nan", "0", "-1"]

# (command, option): what 0 means, documented in its help or the README
ZERO_MEANS = {
    ("cmdcl-run", "--threshold"): "no threshold: every label of the top-k is reported",
    ("cmdcl-run", "--reconnect-tries"): "a live stream ends at its first reconnect that brings no frame",
    ("cmdcl-train", "--seed"): "seed 0, the default",
    ("cmdcl-train", "--encoder-lr-scale"): "the video encoder keeps its initial weights",
    ("cmdcl-train", "--weight-decay"): "no weight decay",
    ("cmdcl-train", "--warmup-epochs"): "no warm-up: the cosine decay starts at once",
    ("cmdcl-train", "--candidates"): "decode every epoch at random times (the help says so)",
    ("cmdcl-synth", "--seed"): "seed 0, the default",
    ("cmdcl-synth", "--home-bias"): "the background is never the activity's own",
    ("cmdcl-mini-vlm", "--seed"): "seed 0, the default",
    ("cmdcl-bench", "--warmup"): "no untimed calls",
    ("cmdcl-serve", "--queue-delay-us"): "no waiting for others to join a batch",
    ("cmdcl-serve", "--restart"): "no restart: the default",
}

# (command, option or argument): why any text is valid there (checked where it is used)
FREE_TEXT = {
    ("cmdcl-run", "inputs"): "video files, folders or stream URLs: each one's failure is reported as it is read",
    ("cmdcl-train", "--data"): "a manifest or a dataset folder, read and checked line by line",
    ("cmdcl-train", "--val"): "a manifest, read and checked line by line",
    ("cmdcl-train", "--model-option"): "FIELD=VALUE pairs, checked with the rest of the model config",
    ("cmdcl-eval", "--data"): "a manifest or a dataset folder, read and checked line by line",
    ("cmdcl-serve", "--host"): "an address, resolved when the server binds",
    ("cmdcl-serve", "--metrics-host"): "an address, resolved when the server binds",
    ("cmdcl-client classify", "--url"): "host:port of a server",
    ("cmdcl-client load-test", "--url"): "host:port of a server",
}


def fast_failures(tmp: Path) -> dict:
    """Per command: the required arguments with inputs that do not exist (or an output that cannot be written), so
    that a run past the parser fails at once, and what its one error line must say."""
    missing = f"{tmp}/missing/x"  # in a folder that does not exist
    a_file = tmp / "a-file"  # no folder can be made in it
    a_file.write_text("not a folder")
    e = re.escape
    return {
        "cmdcl-run": ([f"{missing}.mp4", "--engine", f"{missing}.onnx"], e(f"{missing}.onnx")),
        "cmdcl-eval": (["--ckpt", f"{missing}.pt", "--data", f"{missing}.csv"], e(f"{missing}.pt")),
        "cmdcl-train": (["--data", f"{missing}.csv", "--out", str(tmp / "out.pt")], e(f"{missing}.csv")),
        "cmdcl-export": (["--ckpt", f"{missing}.pt", "--out", str(tmp / "out.onnx")], e(f"{missing}.pt")),
        "cmdcl-build": ([f"{missing}.onnx", "--engine", str(tmp / "out.plan")], e(f"{missing}.onnx")),
        "cmdcl-synth": (["--out", f"{a_file}/synth"], e(f"{a_file}/synth")),  # a folder in a file
        "cmdcl-bench": (["--json", f"{missing}.json"], e(f"{missing}.json")),
        "cmdcl-mini-vlm": (["--out", f"{missing}.pt"], e(f"{missing}.pt")),
        # in a venv without PyTriton cmdcl-serve stops at its import, else at the model
        "cmdcl-serve": (["--engine", f"{missing}.onnx"], f"{e(missing)}.onnx|PyTriton is not installed"),
        "cmdcl-client classify": ([f"{missing}.mp4", "--url", "127.0.0.1:9"], e("127.0.0.1:9")),
        "cmdcl-client load-test": ([f"{missing}.mp4", "--engine", f"{missing}.onnx"], e(f"{missing}.onnx")),
    }


def console_scripts() -> dict[str, click.Command]:
    """Every command setup.py installs (a group's subcommands as `group sub`)."""
    import importlib

    commands = {}
    for name, module, attr in re.findall(r'"(cmdcl-[\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text()):
        command = getattr(importlib.import_module(module), attr)
        subcommands = command.commands if isinstance(command, click.Group) else {"": command}
        commands.update({f"{name} {sub}".strip(): leaf for sub, leaf in subcommands.items()})
    return commands


def kind(param: click.Parameter) -> str:
    """numeric, choice, path, flag or text."""
    if getattr(param, "is_flag", False):
        return "flag"
    kind_of = param.type.item if isinstance(param.type, CommaList) else param.type
    if isinstance(kind_of, (click.types.IntParamType, click.types.FloatParamType)):
        return "numeric"
    if isinstance(kind_of, (click.Choice, TorchDevice)):
        return "choice"
    if isinstance(kind_of, click.Path):
        return "path"
    if isinstance(kind_of, click.types.StringParamType):
        return "text"
    raise AssertionError(f"{param.name}: an option type this test does not know ({param.type!r}): classify it here")


def option_name(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else param.name


COMMANDS = console_scripts()
CASES = [(command, option_name(param), value)
         for command, cli in COMMANDS.items() for param in cli.params if isinstance(param, click.Option)
         for value in {"numeric": ABSURD, "choice": ABSURD_CHOICES}.get(kind(param), [])]


def test_the_commands_and_their_options_are_found():
    assert {"cmdcl-run", "cmdcl-bench", "cmdcl-eval", "cmdcl-mini-vlm", "cmdcl-client load-test"} <= set(COMMANDS)
    assert ("cmdcl-run", "--window", "1,,2") in CASES and ("cmdcl-eval", "--device", "bogus") in CASES
    assert ("cmdcl-bench", "--threads", "99999999999999999999") in CASES


@pytest.mark.parametrize("command, param", [(command, param) for command, cli in COMMANDS.items() for param in cli.params],
                         ids=lambda x: x if isinstance(x, str) else option_name(x))
def test_every_text_option_says_why_it_takes_any_text(command, param):
    if kind(param) == "text":
        assert (command, option_name(param)) in FREE_TEXT, f"{command} {option_name(param)} takes any text: give it a type"


@pytest.mark.parametrize("command, option, value", CASES)
def test_absurd_values_are_usage_errors_or_documented(command, option, value, tmp_path):
    base, failure = fast_failures(tmp_path)[command]
    result = CliRunner().invoke(COMMANDS[command], [*base, option, value])
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    if value == "0" and (command, option) in ZERO_MEANS:
        # accepted: the run got past the parser and stopped at its missing input, one line
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and re.search(failure, lines[0]) and option not in lines[0], result.output
        return
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert errors[0] == result.output.strip().splitlines()[-1]
    assert f"'{option}'" in errors[0] or f"{option}:" in errors[0], errors[0]


def test_zero_means_lists_only_options_that_exist():
    options = {(command, option) for command, option, _ in CASES}
    assert set(ZERO_MEANS) <= options and set(FREE_TEXT) <= {(c, option_name(p)) for c, cli in COMMANDS.items() for p in cli.params}


@pytest.mark.parametrize("args, message", [
    (["--opt-batch", "64", "--max-batch", "8"], "Invalid value for --opt-batch: 64 is more than --max-batch 8"),
])
def test_options_that_bound_each_other(args, message, tmp_path):
    result = CliRunner().invoke(COMMANDS["cmdcl-build"], [str(tmp_path / "missing.onnx"), *args])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == f"Error: {message}", result.output


def test_the_bench_refuses_to_generate_a_video_longer_than_ten_hours(tmp_path, monkeypatch):
    """--iters, --warmup and --stride-frames size the bench's stream video, which only the model's grid turns into
    seconds: refused before anything is generated."""
    from cmdcl.bench.videos import MAX_VIDEO_SECONDS, synthetic_video

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"^the bench would generate a 36001 s test video; at most 36000 s \(10 h\): lower --iters"):
        synthetic_video(MAX_VIDEO_SECONDS + 1, 2, print)
    assert not list(tmp_path.rglob("*.mp4"))


def test_a_gpu_pytorch_does_not_see_is_one_line():
    from cmdcl.train.loop import pick_device

    with pytest.raises(ValueError, match=r"^--device cuda:9999: PyTorch sees \d+ CUDA GPU\(s\) on this machine$"):
        pick_device("cuda:9999")
