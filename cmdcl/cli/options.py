"""Option types shared by the `cmdcl-*` commands.

Every number an option takes is checked when the command line is parsed (click's usage error: one line, exit
status 2), against finite bounds read from how the value is used: NaN, infinities and values that would overflow
or size memory, threads or files beyond reason are refused before any work starts. Bounds that depend on the model
(a window too short for its frames) are checked once it is loaded, also as usage errors.
"""

from __future__ import annotations

import math
import re

import click

from ..artifacts import LIMITS, MAX_CLASSES, SAMPLING_LIMITS
from ..runtime.decode_pool import MAX_WORKERS

MAX_SECONDS = SAMPLING_LIMITS["window_seconds"][1]  # a day: windows, strides and network timeouts
MAX_SEED = 2**31 - 1  # seeds derived from it (seed + 1 for the second k-means) stay within 32-bit seeds (scikit-learn)
MAX_BATCH = 1024  # clips (a frame encoder: frames) per model call, or per engine profile and Triton batch
MAX_THREADS = 1024  # CPU threads of PyTorch and ONNX Runtime (OpenMP crashes creating 100,000)
MAX_EPOCHS = 1000
MAX_RETRIES = 1000  # reconnects and server restarts: beyond any that could help, short of "never give up"


class OutputPath(click.Path):
    """click.Path for an option the command writes (a file, or with file_okay=False a folder). Each goes through the
    command's clash check (cmdcl.output_files.check_outputs; cmdcl-synth's folder: its own check of what it replaces)
    before anything loads; tests/test_output_safety.py finds them by this type and points each at every input."""


class FiniteFloat(click.FloatRange):
    """A float in [min, max] (either end open), both bounds finite. Unlike click.FloatRange it refuses NaN,
    which passes every range check (each comparison with NaN is false)."""

    def __init__(self, min: float, max: float, *, min_open: bool = False, max_open: bool = False):
        if not (math.isfinite(min) and math.isfinite(max)):
            raise ValueError("FiniteFloat needs finite bounds")
        super().__init__(min, max, min_open=min_open, max_open=max_open)

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r:.40} is not a number", param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r:.40} is not a number", param, ctx)
        return super().convert(number, param, ctx)


class CommaList(click.ParamType):
    """Comma-separated items of one type, e.g. `8,32`: a tuple. An empty item (`8,,32`) is refused, as is any item
    its type refuses. With multiple=True each occurrence gives a tuple; `joined` flattens them."""

    def __init__(self, item: click.ParamType, example: str):
        self.item, self.example = item, example
        self.name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):  # already converted
            return value
        texts = [text.strip() for text in str(value).split(",")]
        if "" in texts:
            self.fail(f"expected {self.example}, got {value!r:.80}: an empty item", param, ctx)
        items = []
        for text in texts:
            try:
                items.append(self.item.convert(text, param, ctx))
            except click.BadParameter as exc:
                self.fail(f"expected {self.example}, got {value!r:.80}: {exc.message}", param, ctx)
        return tuple(items)


def joined(ctx, param, value: tuple) -> tuple:
    """The items of a CommaList option given several times (multiple=True), in order."""
    return tuple(item for items in value for item in items)


class TorchDevice(click.ParamType):
    """A PyTorch device: auto (cuda when PyTorch sees a GPU), cpu, cuda or cuda:N. Checked here, since torch.device
    would fail only once the model is loaded; whether that GPU exists, cmdcl.train.loop.pick_device checks."""

    name = "device"

    def convert(self, value, param, ctx):
        if re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", str(value)):
            return str(value)
        self.fail(f"{value!r:.40} is not auto, cpu, cuda or cuda:N", param, ctx)


SECONDS = FiniteFloat(0, MAX_SECONDS, min_open=True)
SECONDS_LIST = CommaList(SECONDS, "seconds like 8 or 8,32")
SEED = click.IntRange(0, MAX_SEED)
BATCH = click.IntRange(1, MAX_BATCH)
WORKERS = click.IntRange(1, MAX_WORKERS)
THREADS = click.IntRange(1, MAX_THREADS)
EPOCHS = click.IntRange(1, MAX_EPOCHS)
RETRIES = click.IntRange(0, MAX_RETRIES)
LEARNING_RATE = FiniteFloat(0, 1, min_open=True)
PROBABILITY = FiniteFloat(0, 1)
TOP_K = click.IntRange(1, MAX_CLASSES)  # more than the model's classes: all of them
CLASSES = click.IntRange(1, MAX_CLASSES)
FRAMES = click.IntRange(1, LIMITS["num_frames"][1])
IMAGE_SIZE = click.IntRange(16, LIMITS["image_size"][1])
DEVICE = TorchDevice()
