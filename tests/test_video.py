"""cmdcl.data.video: sampling, seek vs sequential, pts times, rotation, bad files."""

import random

import av
import numpy as np
import pytest

from cmdcl.data.video import Reconnect, VideoError, iter_grid_frames, list_videos, read_clip, segment_times, write_video


def ramp(n, height=48, width=64):
    """Frame i is a flat grey of level 4*i (index readable after lossy coding),
    with a white band on its top rows (orientation readable)."""
    frames = np.repeat((4 * np.arange(n, dtype=np.uint8))[:, None, None, None], 3, axis=3)
    frames = np.broadcast_to(frames, (n, height, width, 3)).copy()
    frames[:, :6] = 255
    return frames


def frame_index(frames):
    """Recover frame i from its grey level (centre of the frame)."""
    c = frames.shape[1] // 2
    return np.rint(frames[:, c - 4 : c + 4, c - 4 : c + 4].mean(axis=(1, 2, 3)) / 4).astype(int)


def test_segment_times():
    assert np.allclose(segment_times(8.0, 4), [1, 3, 5, 7])
    rng = np.random.default_rng(0)
    t = segment_times(8.0, 4, "random", rng)
    assert np.all((t >= [0, 2, 4, 6]) & (t < [2, 4, 6, 8]))
    assert np.allclose(t, segment_times(8.0, 4, "random", np.random.default_rng(0)))
    with pytest.raises(ValueError):
        segment_times(8.0, 4, "random")


@pytest.mark.parametrize("gop, strategy", [(12, "seek"), (250, "sequential")])
def test_read_clip_uniform_frames_and_strategy(tmp_path, gop, strategy):
    path = write_video(tmp_path / "v.mp4", ramp(60), rate=10, gop=gop)  # 6 s, frame i at i/10 s
    clip = read_clip(path, 6, 32)
    assert clip.frames.shape == (6, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.strategy == strategy
    assert clip.duration == pytest.approx(6.0)
    # Segment centres 0.5, 1.5, ... s show frames 5, 15, ...
    assert np.allclose(clip.times, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    assert list(frame_index(clip.frames)) == [5, 15, 25, 35, 45, 55]
    if strategy == "sequential":
        assert clip.frames_decoded == 56  # one pass up to the last sampled frame
    else:
        assert clip.frames_decoded < 56


def test_forced_strategies_read_the_same_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", ramp(60), rate=10, gop=12)
    seek, sequential = (read_clip(path, 6, 32, strategy=s) for s in ("seek", "sequential"))
    assert (seek.strategy, sequential.strategy) == ("seek", "sequential")
    assert list(frame_index(seek.frames)) == list(frame_index(sequential.frames)) == [5, 15, 25, 35, 45, 55]
    assert seek.frames_decoded < sequential.frames_decoded == 56


def test_variable_frame_rate_times_come_from_pts(tmp_path):
    gaps = [0.3 if i % 2 else 0.05 for i in range(19)]
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    path = write_video(tmp_path / "vfr.mkv", ramp(20), times=times)
    clip = read_clip(path, 5, 32)
    duration = times[-1] + np.median(np.diff(times))
    expected = [np.searchsorted(times, t + 1e-9, side="right") - 1 for t in segment_times(duration, 5)]
    assert list(frame_index(clip.frames)) == expected
    assert np.allclose(clip.times, times[expected], atol=1e-3)
    # The nominal-rate answer would differ: proof the times are not index / fps.
    assert not np.allclose(clip.times, np.array(expected) / 24)


def test_rotation_side_data_is_applied(tmp_path):
    path = write_video(tmp_path / "rot.mp4", ramp(8), rotation=90)
    frame = read_clip(path, 1, 32).frames[0].astype(int)
    # The white band on top, turned 90 degrees counter-clockwise, is on the left.
    assert frame[:, :2].mean() > 200 and frame[:2, 8:].mean() < 150


def test_short_video_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", ramp(3), rate=10)
    clip = read_clip(path, 8, 32)
    assert clip.frames.shape[0] == 8
    assert list(frame_index(clip.frames)) == [0, 0, 0, 1, 1, 2, 2, 2]  # segment centres at (i + 0.5) * 0.0375 s


def test_a_one_frame_video_is_read_not_refused_as_truncated(tmp_path):
    """One frame is on screen for one frame period (0.1 s at 10 fps), which the file declares as its duration."""
    path = write_video(tmp_path / "one.mp4", ramp(1), rate=10)
    for sampling in ("exact", "keyframe"):
        clip = read_clip(path, 4, 32, sampling=sampling)
        assert clip.frames.shape[0] == 4 and clip.frames_decoded == 1 and clip.duration == pytest.approx(0.1)


def test_random_offsets_stay_in_segments(tmp_path):
    path = write_video(tmp_path / "v.mp4", ramp(40), rate=10)
    clip = read_clip(path, 4, 32, offsets="random", rng=np.random.default_rng(1))
    segment = np.floor(clip.times / 1.0)
    assert list(segment) == [0, 1, 2, 3]


def test_grid_frames_follow_pts(tmp_path):
    times = np.array([0.0, 0.05, 0.4, 0.45, 0.9, 1.0])
    path = write_video(tmp_path / "vfr.mkv", ramp(6), times=times)
    grid = list(iter_grid_frames(path, rate=5, size=32))
    assert [round(t, 3) for t, _ in grid] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert list(frame_index(np.stack([f for _, f in grid]))) == [0, 1, 2, 3, 3, 5]


def test_list_videos_skips_non_videos(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "sub/a.MKV", "notes.txt", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_videos(tmp_path)] == ["b.mp4", "sub/a.MKV"]


# ---- bad files -------------------------------------------------------------------------
def audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def garbled_payload(path):
    """Keep the MP4 header and index, replace the coded frames with noise."""
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 104
    rnd = random.Random(0)
    data[start : len(data) - 2000] = bytes(rnd.randrange(256) for _ in range(len(data) - 2000 - start))
    path.write_bytes(bytes(data))
    return path


def written(path, data):
    path.write_bytes(data)
    return path


def encode_ramp(path, frames, **open_options):
    """`frames` frames of the ramp as H.264 at 10 fps, the container opened with `open_options` (format, options)."""
    with av.open(str(path), "w", **open_options) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for image in ramp(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def faststart_mp4(path):
    return encode_ramp(path, 30, options={"movflags": "faststart"})


BAD_FILES = {
    "missing": (lambda d: d / "nope.mp4", "no such file"),
    "empty": (lambda d: written(d / "empty.mp4", b""), "empty file"),
    "directory": (lambda d: d, "is a directory"),
    "not a video": (lambda d: written(d / "t.mp4", b"hello\n" * 50), "not a video"),
    "audio only": (lambda d: audio_only(d / "a.wav"), "no video stream (audio only)"),
    "truncated mp4 (index at the end)": (lambda d: cut(write_video(d / "c.mp4", ramp(40)), 0.5), "truncated"),
    "truncated mp4 (faststart)": (lambda d: cut(faststart_mp4(d / "f.mp4"), 0.5), "truncated"),
    "truncated mkv": (lambda d: cut(write_video(d / "c.mkv", ramp(40)), 0.5), "truncated"),
    "truncated webm": (lambda d: cut(write_video(d / "c.webm", ramp(40), codec="libvpx-vp9"), 0.5), "truncated"),
    "undecodable": (lambda d: garbled_payload(write_video(d / "g.mp4",
                                                          np.random.default_rng(0).integers(0, 255, (40, 48, 64, 3), dtype=np.uint8))),
                    "undecodable"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_raise_video_error_naming_file_and_reason(tmp_path, kind):
    make, reason = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(VideoError) as info:
        read_clip(path, 4, 32)
    assert str(info.value).startswith(f"{path}: ") and reason in info.value.reason
    with pytest.raises(VideoError) as info:
        list(iter_grid_frames(path, rate=4, size=32))
    assert str(info.value).startswith(f"{path}: ")


def test_frames_without_timestamps_are_named_so_in_both_modes(tmp_path):
    """A raw H.264 stream (a camera's .h264) decodes, but none of its frames has a pts; stream mode said
    "no frame decoded", as for a file that does not decode at all."""
    path = encode_ramp(tmp_path / "raw.h264", 10, format="h264")
    for read in (lambda: read_clip(path, 4, 32), lambda: list(iter_grid_frames(path, rate=4, size=32))):
        with pytest.raises(VideoError, match="no video frames with timestamps"):
            read()


def test_video_mode_refuses_endless_sources():
    with pytest.raises(VideoError, match="rtsp://127.0.0.1:9/cam: a live stream has no end"):
        read_clip("rtsp://127.0.0.1:9/cam", 4, 32)


def test_live_source_gives_up_after_bounded_tries():
    delays = []
    with pytest.raises(VideoError, match="gave up after 3 reconnects"):
        list(iter_grid_frames("http://127.0.0.1:9/none.mp4", 4, 32, Reconnect(tries=3, initial_delay=0.5, max_delay=1.0),
                              sleep=delays.append))
    assert delays == [0.5, 1.0, 1.0]
