"""frames_decoded of read_clip when keyframe samples decoded alone mix with the exact samples' plan (issue 21, item 5).

docs/design.md section 5.2: with sampling="keyframe" a segment that holds a keyframe takes the one nearest its centre,
decoded alone (one frame); a segment without one keeps its exact sample, decoded by the cheaper of seeking GOP by GOP
and one sequential pass, and a keyframe sample that plan decodes anyway comes from it (never decoded twice).
Each expected count below is worked out by hand from the file's GOP layout.

The videos: 40 frames at 10 per second (4.0 s), F = 4: segments of 1 s, centres at 0.5, 1.5, 2.5, 3.5 s, so the exact
samples are frames 5, 15, 25 and 35. Keyframes (IDR) only where the test puts them; decoding from a keyframe to frame
t costs t - keyframe + 1 frames."""

import pytest

from cmdcl.data.video import read_clip
from test_stream_readers import index_of, keyed_video


def frames_shown(clip):
    return [index_of(frame) for frame in clip.frames]


@pytest.mark.parametrize("keyframes, picks, decoded, strategy", [
    # segments 0-2 hold keyframes 0, 12, 22; segment 3 none: frame 35, reached by seeking to 22, which decodes 22
    # on the way: 0 and 12 alone (2) + 22..35 (14)
    ({0, 12, 22}, [0, 12, 22, 35], 2 + 14, "seek"),
    # segment 0 holds 0 and 8 (8 is nearer 5), segments 1 and 2 none: frames 15 and 25 from one seek to 8 (8..25: 18,
    # keyframe 8 among them), 30 alone (1)
    ({0, 8, 30}, [8, 15, 25, 30], 18 + 1, "seek"),
    # segments 1 and 2 without a keyframe, both in the GOP of 0: seeking (0..15, 16..25) and one pass (0..25) cost the
    # same 26 frames, keyframe 0 among them; 30 alone (1). On a tie the pass is taken.
    ({0, 30}, [0, 15, 25, 30], 26 + 1, "sequential"),
    # segment 0 holds 0 and 1 (1 is nearer 5); 15, 25 and 35 are in the GOP of 1: one seek to 1 (1..35: 35 frames, 1 among
    # them) beats one pass (0..35: 36) by the frame before the keyframe
    ({0, 1}, [1, 15, 25, 35], 35, "seek"),
])
def test_keyframe_sampling_counts_each_decoded_frame_once(tmp_path, keyframes, picks, decoded, strategy):
    path = keyed_video(tmp_path / "v.mp4", 40, keyframes)
    clip = read_clip(path, 4, 32, sampling="keyframe")
    assert frames_shown(clip) == picks
    assert clip.keyframes == len(keyframes & set(picks))
    assert (clip.frames_decoded, clip.strategy) == (decoded, strategy)


@pytest.mark.parametrize("keyframes, decoded, strategy", [
    ({0, 12, 22}, 6 + 4 + 14, "seek"),  # GOP 0: 0..5; GOP 12: 12..15; GOP 22: 22..25 and on to 35
    ({0, 8, 30}, 6 + 18 + 6, "seek"),  # GOP 0: 0..5; GOP 8: 8..25; GOP 30: 30..35
    ({0, 30}, 26 + 6, "seek"),  # GOP 0: 0..25 (5, 15 and 25 in one run on); GOP 30: 30..35; one pass would be 36
])
def test_exact_sampling_counts_the_plans_frames(tmp_path, keyframes, decoded, strategy):
    path = keyed_video(tmp_path / "v.mp4", 40, keyframes)
    clip = read_clip(path, 4, 32)
    assert frames_shown(clip) == [5, 15, 25, 35] and clip.keyframes == 0
    assert (clip.frames_decoded, clip.strategy) == (decoded, strategy)
