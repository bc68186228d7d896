"""Stream mode's grid at its edges (issue 21, item 5): a tie between two keyframes, a gap that ends between grid times,
a part shorter than a window just before a gap, and the rounding of the stride and of the window spans to grid frames.

Every expected value is worked out by hand from the layout of the test video (comments say how), not by running the
code under test a second way."""

import numpy as np
import pytest

from cmdcl.artifacts import MAX_GRID_RATE, MAX_RING_FRAMES, stream_grid, window_scales
from cmdcl.data.video import iter_grid_frames, write_video
from cmdcl.runtime import Recognizer
from test_stream_readers import grid, keyed_video, keyframe_times
from test_stream_reliability import EchoBackend, finishes_within

LEVEL = 4  # frame i of a test video below is flat grey at LEVEL * i (at most 63 frames)


def numbered_video(path, times):
    """Flat grey frames, frame i at level LEVEL * i, shown at `times` (seconds, exact in the file's 1 ms time base)."""
    frames = np.stack([np.full((32, 32, 3), LEVEL * i, np.uint8) for i in range(len(times))])
    return write_video(path, frames, times=times)


def number(image) -> int:
    """The index of a frame of `numbered_video` (from its mean grey level)."""
    return round(float(np.mean(image)) / LEVEL)


class WindowFrames(EchoBackend):
    """EchoBackend that remembers, for each window it classifies, the indices of its frames (a token is a frame's
    mean colour / 255, so the index is recovered exactly as `number` does)."""

    def __init__(self):
        super().__init__()
        self.windows = []

    def classify_tokens(self, tokens):
        self.windows += [[round(float(token.mean()) * 255 / LEVEL) for token in window] for window in tokens]
        return super().classify_tokens(tokens)


def windows_of(records):
    return [r for r in records if not r.get("summary")]


# ---- keyframes: the earlier one on a tie -----------------------------------------------------------------------------
def test_a_grid_time_half_way_between_two_keyframes_takes_the_earlier(tmp_path):
    """8 frames per second (time base 1/16384 s: every time below is exact), keyframes at frames 0, 6, 10, 14, ..., 30:
    0, 0.75, 1.25, 1.75, ... s. A grid of 1 frame per second decodes keyframes only (GOPs of 0.5 s), and the grid
    times 1, 2 and 3 s each lie exactly half way between two keyframes (0.75 | 1.25, 1.75 | 2.25, 2.75 | 3.25):
    docs/design.md section 5.3 and iter_grid_frames give the earlier one (frames 6, 14, 22), not the later (10, 18, 26)
    nor the frame on screen (8, 16, 24)."""
    path = keyed_video(tmp_path / "tie.mp4", 32, {0, 6, 10, 14, 18, 22, 26, 30}, rate=8)
    assert keyframe_times(path) == [0.0, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75]  # the layout the expectations rely on
    frames, status = grid(path, 1.0)
    assert frames == [(0.0, 0, "keyframes"), (1.0, 6, "keyframes"), (2.0, 14, "keyframes"), (3.0, 22, "keyframes")]
    assert status.frames_decoded == 8  # the keyframes alone
    full, _ = grid(path, 1.0, keyframes=False)
    assert [index for _, index, _ in full] == [0, 8, 16, 24]  # what decoding every frame shows


# ---- a gap that ends between grid times ------------------------------------------------------------------------------
def test_a_gap_that_ends_between_grid_times_restarts_the_grid_at_the_next_grid_time(tmp_path):
    """Frames every 0.1 s from 0 to 2.9 s (frames 0-29), then from 10.2 s (frames 30-59, a jump of 7.3 s: a gap). A grid of
    2 frames per second ends at 2.5 s (the last grid time the frame at 2.9 s covers) and restarts at 10.5 s, the first
    grid time after 10.2 s: not at 10.0 s (which would show the frame before the gap, or a frame from before its time)
    nor later. Grid time 10.5 s shows frame 33 (10.5 s)."""
    times = [i / 10 for i in range(30)] + [10.2 + i / 10 for i in range(30)]
    path = numbered_video(tmp_path / "gap.mkv", times)
    shown = [(round(t, 6), number(image)) for t, image in iter_grid_frames(path, 2.0, 32)]
    before = [(k / 2, 5 * k) for k in range(6)]  # 0.0 ... 2.5 s: frames 0, 5, ..., 25
    after = [(10.5 + k / 2, 33 + 5 * k) for k in range(6)]  # 10.5 ... 13.0 s: frames 33, 38, ..., 58
    assert shown == before + after

    backend = WindowFrames()
    records = finishes_within(30, lambda: list(Recognizer(backend, window=2.0, stride=1.0).stream(path)))  # F = 4, stride 2 frames
    windows = windows_of(records)
    assert [(w["start"], w["end"]) for w in windows] == [(0.0, 2.0), (1.0, 3.0), (10.5, 12.5), (11.5, 13.5)]
    assert backend.windows == [[0, 5, 10, 15], [10, 15, 20, 25], [33, 38, 43, 48], [43, 48, 53, 58]]  # none spans the gap
    # the grid skipped 3.0 ... 10.0 s: from the end of the last grid step before the gap (3.0 s) to 10.5 s
    assert [w.get("gap_before") for w in windows] == [None, None, 7.5, None]
    assert records[-1]["gaps"] == 1 and records[-1]["windows"] == 4


# ---- a part shorter than a window before a gap ------------------------------------------------------------------------
PARTS = [(0.0, 5), (10.0, 20), (30.0, 7), (50.0, 15)]  # (start in seconds, frames every 0.2 s); gaps of 9-19 s between


def parts_video(path):
    """Four parts, each a run of frames every 0.2 s, separated by gaps (frame indices run on across the parts)."""
    return numbered_video(path, [start + i / 5 for start, count in PARTS for i in range(count)])


def test_a_part_shorter_than_a_window_before_a_gap_gets_one_window_of_its_frames_repeated(tmp_path):
    """docs/design.md section 5.3: after a gap the grid and the ring buffer restart, and a part shorter than one window
    gets one window of its frames repeated uniformly (window_positions), like a source shorter than one window.
    F = 4, grid 2 frames per second, stride 2 grid frames. By hand (frame k of part p is frame first_p + k):
      part 1, frames 0-4 at 0.0-0.8 s: grid 0.0, 0.5 s -> frames 0, 2 (2 < 4): one window [0, 0, 2, 2], 0.0-1.0 s
      part 2, frames 5-24 at 10.0-13.8 s: grid 10.0 ... 13.5 s -> frames 5, 7, 10, 12, 15, 17, 20, 22: three windows
      part 3, frames 25-31 at 30.0-31.2 s: grid 30.0, 30.5, 31.0 s -> frames 25, 27, 30 (3 < 4): positions
              floor((j + 1/2) 3 / 4) = 0, 1, 1, 2: one window [25, 27, 27, 30], 30.0-31.5 s
      part 4, frames 32-46 at 50.0-52.8 s: grid 50.0 ... 52.5 s -> frames 32, 34, 37, 39, 42, 44: two windows
    gap_before: a part's first grid time minus the end of the last grid step before it."""
    path = parts_video(tmp_path / "parts.mkv")
    backend = WindowFrames()
    records = finishes_within(30, lambda: list(Recognizer(backend, window=2.0, stride=1.0).stream(path)))
    windows = windows_of(records)
    assert backend.windows == [[0, 0, 2, 2],
                               [5, 7, 10, 12], [10, 12, 15, 17], [15, 17, 20, 22],
                               [25, 27, 27, 30],
                               [32, 34, 37, 39], [37, 39, 42, 44]]
    assert [(w["start"], w["end"]) for w in windows] == [(0.0, 1.0), (10.0, 12.0), (11.0, 13.0), (12.0, 14.0), (30.0, 31.5),
                                                         (50.0, 52.0), (51.0, 53.0)]
    assert [w.get("gap_before") for w in windows] == [None, 9.0, None, None, 16.0, 18.5, None]
    assert (records[-1]["windows"], records[-1]["gaps"]) == (7, 3)


def test_with_several_window_lengths_a_short_part_gets_only_the_shortest_ones_window(tmp_path):
    """The same parts with windows of 2 and 3 s (spans of 4 and 6 grid frames): the 2 s windows are the single-length
    run's; 3 s windows come only where a part holds 6 grid frames (parts 2 and 4), at the stride steps from its 6th on."""
    path = parts_video(tmp_path / "parts.mkv")
    backend = WindowFrames()
    records = finishes_within(30, lambda: list(Recognizer(backend, window=[2.0, 3.0], stride=1.0).stream(path)))
    short = [(w["start"], w["end"]) for w in windows_of(records) if w["scale"] == 2.0]
    long = [(w["start"], w["end"], w.get("gap_before")) for w in windows_of(records) if w["scale"] == 3.0]
    assert short == [(0.0, 1.0), (10.0, 12.0), (11.0, 13.0), (12.0, 14.0), (30.0, 31.5), (50.0, 52.0), (51.0, 53.0)]
    # part 2: spans ending at its 6th and 8th grid frame (12.5 and 13.5 s); part 4: its 6 grid frames (52.5 s)
    assert long == [(10.0, 13.0, 9.0), (11.0, 14.0, None), (50.0, 53.0, 18.5)]
    # positions floor((j + 1/2) 6 / 4) = 0, 2, 3, 5 of the span's 6 frames
    assert [5, 10, 12, 17] in backend.windows and [32, 37, 39, 44] in backend.windows
    assert [(s["scale"], s["windows"], s["gaps"]) for s in records if s.get("summary")] == [(2.0, 7, 3), (3.0, 3, 3)]


# ---- rounding to grid frames -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride, frames", [
    (1.2, 2),  # 2.4 grid frames: rounded down
    (1.3, 3),  # 2.6: rounded up (not truncated)
    (0.3, 1),  # 0.6: rounded up to 1
    (0.2, 1),  # 0.4 rounds to 0: at least one grid frame
    (0.001, 1),
    (7.0, 14),
])
def test_the_stride_is_rounded_to_the_nearest_grid_step_and_at_least_one(stride, frames):
    """docs/design.md section 5.3: `--stride` seconds, rounded to grid frames (>= 1). A 2 s window of F = 4: 2 grid frames per second."""
    assert stream_grid(4, (2.0,), stride) == (2.0, (4,), frames)
    assert Recognizer(EchoBackend(), window=2.0, stride=stride).stride_frames == frames


def test_windows_come_every_rounded_stride(tmp_path):
    """A stride of 1.3 s on a grid of 2 frames per second is 3 grid frames (2.6 rounded): windows start 1.5 s apart."""
    path = numbered_video(tmp_path / "v.mkv", [i / 5 for i in range(35)])  # 7 s: grid 0.0 ... 6.5 s, 14 frames
    records = list(Recognizer(EchoBackend(), window=2.0, stride=1.3).stream(path))
    assert [w["start"] for w in windows_of(records)] == [0.0, 1.5, 3.0, 4.5]  # windows end at grid frames 3, 6, 9 and 12


@pytest.mark.parametrize("scales, spans", [
    ((2.0, 4.4), (4, 9)),  # 8.8 grid frames: rounded up, not truncated
    ((2.0, 3.1), (4, 6)),  # 6.2: rounded down
    ((2.0, 2.5, 6.0), (4, 5, 12)),
])
def test_window_spans_are_rounded_to_the_nearest_grid_frame(scales, spans):
    """N_k = round(F W_k / W_1) (docs/design.md section 5.3); the grid is the shortest window's."""
    assert stream_grid(4, scales, 1.0)[:2] == (2.0, spans)
    assert window_scales(list(scales), 4) == scales


def test_window_bounds_hold_exactly_at_the_limits():
    """F / W_1 = MAX_GRID_RATE is allowed, a hair more is not; a ring of exactly MAX_RING_FRAMES grid frames is allowed,
    a hair more is not."""
    assert 4 / 0.004 == MAX_GRID_RATE  # exact in floating point: the limit itself is what is tried
    assert window_scales(0.004, 4) == (0.004,)
    with pytest.raises(ValueError, match="too short"):
        window_scales(np.nextafter(0.004, 0), 4)
    longest = MAX_RING_FRAMES / 8  # 512 s at the grid of a 1 s window of 8 frames: exactly MAX_RING_FRAMES grid frames
    assert window_scales([1.0, longest], 8) == (1.0, longest)
    with pytest.raises(ValueError, match=f"at most {MAX_RING_FRAMES}"):
        window_scales([1.0, np.nextafter(longest, np.inf)], 8)
