"""Option parsers shared by several `cmdcl-*` commands."""

from __future__ import annotations

import math

import click


class OutputPath(click.Path):
    """click.Path for an option the command writes (a file, or with file_okay=False a folder). Each goes through the
    command's clash check (cmdcl.output_files.check_outputs; cmdcl-synth's folder: its own check of what it replaces)
    before anything loads; tests/test_output_safety.py finds them by this type and points each at every input."""


def seconds_list(ctx, param, value) -> tuple[float, ...] | None:
    """A click callback for options in seconds written `8` or `8,32` (an option given several times: all its values,
    in order), each a positive, finite number. How many, and how they fit the model, the command checks once the
    model is loaded (cmdcl.artifacts.window_scales, cmdcl.train.stream_eval.parse_configs)."""
    if value is None:
        return None
    texts = value if isinstance(value, tuple) else (value,)
    try:
        seconds = tuple(float(item) for text in texts for item in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected seconds like 8 or 8,32, got {','.join(texts)!r:.80}") from None
    if not all(math.isfinite(x) and x > 0 for x in seconds):
        raise click.BadParameter(f"every value must be a positive number of seconds, got {','.join(texts)!r:.80}")
    return seconds
