"""Every bound of a model's config and recorded sampling holds exactly at its ends (issue 21, item 5): the bound itself
is accepted, the next representable value beyond it is refused (docs/design.md sections 2.9 and 4.4)."""

import dataclasses

import numpy as np
import pytest

from cmdcl.artifacts import MAX_GRID_RATE
from cmdcl.model.config import LIMITS, SAMPLING_LIMITS, CMDCLConfig, TextConfig, VisionConfig, sampling_problem, tiny_config


def beyond(value, direction):
    """The next integer, or the next float, past `value` towards `direction` (-1 or +1)."""
    if isinstance(value, int):
        return value + direction
    return float(np.nextafter(value, direction * np.inf))


# docs/design.md section 4.4, "sampling": the ranges a recorded sampling's fields must be in
DESIGN_SAMPLING = {"stream_fps": (1e-5, 1000.0), "window_seconds": (0.01, 86400.0), "stride_frames": (1, 4096),
                   "clip_seconds": (0.01, 86400.0)}
# the lower bounds of LIMITS: a size of at least 1, except token_grid and depth, where 0 turns the part off (section 2.4)
LOWEST = {**{name: 1 for name in LIMITS}, "token_grid": 0, "depth": 0, "mlp_ratio": 0.25, "logit_scale_init": 1e-3}


@pytest.mark.parametrize("key", sorted(DESIGN_SAMPLING))
def test_sampling_limits_accept_their_ends_and_refuse_just_beyond(key):
    low, high = DESIGN_SAMPLING[key]
    assert set(SAMPLING_LIMITS) == set(DESIGN_SAMPLING)
    for accepted in (low, high):
        assert sampling_problem({key: accepted}, 8) is None, accepted
    for refused in (beyond(low, -1), beyond(high, +1)):
        problem = sampling_problem({key: refused}, 8)
        assert problem is not None and problem.startswith(f"sampling {key} {refused!r}"), refused


def test_the_sampling_grid_rate_is_allowed_up_to_the_limit_exactly():
    """F / window_seconds <= MAX_GRID_RATE: 20 frames in 0.02 s is exactly 1000 per second, and the window is inside its
    own range, so only the rate rule can refuse the next shorter window."""
    assert 20 / 0.02 == MAX_GRID_RATE
    assert sampling_problem({"window_seconds": 0.02}, 20) is None
    shorter = beyond(0.02, -1)
    assert "more than 1000 frames per second" in sampling_problem({"window_seconds": shorter}, 20)


def limited_fields():
    """(path, low, high) of every config field with a LIMITS range: "vision.width", "depth", ..."""
    towers = [("vision.", VisionConfig), ("text.", TextConfig), ("", CMDCLConfig)]
    return [(prefix + f.name, *LIMITS[f.name]) for prefix, tower in towers for f in dataclasses.fields(tower) if f.name in LIMITS]


def range_problem(path, value):
    """The config problem of `path` set to `value` in the tiny config (None when its range accepts it; the config may
    still be refused for its shape, e.g. heads that do not divide the width, which is not what is tested here)."""
    config = tiny_config().to_dict()
    *tower, name = path.split(".")
    (config[tower[0]] if tower else config)[name] = value
    try:
        CMDCLConfig.from_dict(config)
    except ValueError as exc:
        return next((p for p in str(exc).split("; ") if f"{path} {value!r}" in p and "out of range" in p), None)
    return None


@pytest.mark.parametrize("path, low, high", limited_fields())
def test_config_limits_accept_their_ends_and_refuse_just_beyond(path, low, high):
    assert low == LOWEST[path.split(".")[-1]]
    assert range_problem(path, low) is None and range_problem(path, high) is None
    for refused in (beyond(low, -1), beyond(high, +1)):
        assert range_problem(path, refused) is not None, refused


def test_every_limit_is_tried():
    assert {path.split(".")[-1] for path, _, _ in limited_fields()} == set(LIMITS)
