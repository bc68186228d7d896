"""read_clip(sampling="keyframe"): keyframes within their segments, decoded alone; exact samples elsewhere."""

import av
import numpy as np
import pytest

from cmdcl.data import video
from cmdcl.data.video import VideoError, frame_to_rgb, read_clip, segment_times, write_video
from test_video import BAD_FILES, frame_index, ramp


def packet_scan(path):
    """(every frame's pts, the keyframes' pts, time base, first pts) from PyAV's demuxer, independently of cmdcl."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.pts is not None and p.size]
        frame_pts = sorted(p.pts for p in packets)
        return frame_pts, sorted(p.pts for p in packets if p.is_keyframe), float(stream.time_base), frame_pts[0]


def decode_all(path, size):
    """{pts: RGB} of every frame, decoded in one pass from the start."""
    with av.open(str(path)) as container:
        return {frame.pts: frame_to_rgb(frame, size) for frame in container.decode(video=0)}


def expected_keyframes(path, num_frames):
    """Per segment: the keyframe nearest the segment's centre, or None when the segment holds none."""
    frame_pts, keys, tb, first = packet_scan(path)
    duration = (frame_pts[-1] - first) * tb + np.median(np.diff(frame_pts)) * tb
    step = duration / num_frames
    picks = []
    for i, centre in enumerate(segment_times(duration, num_frames)):
        inside = [k for k in keys if i * step - 1e-9 <= (k - first) * tb < (i + 1) * step - 1e-9]
        picks.append(min(inside, key=lambda k: abs((k - first) * tb - centre)) if inside else None)
    return picks, tb, first


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".mkv", "libx264"), (".ts", "libx264"), (".webm", "libvpx-vp9")])
def test_keyframe_samples_are_the_keyframes_nearest_segment_centres_and_decode_like_a_full_pass(tmp_path, suffix, codec):
    path = write_video(tmp_path / f"v{suffix}", ramp(60), rate=10, gop=4, codec=codec)  # a keyframe every 0.4 s; x264 adds B-frames
    picks, tb, first = expected_keyframes(path, 6)
    assert all(p is not None for p in picks)  # every 1 s segment holds two or three keyframes
    clip = read_clip(path, 6, 32, sampling="keyframe")
    assert np.allclose(clip.times, [(p - first) * tb for p in picks])
    assert clip.keyframes == 6 and clip.frames_decoded == 6 and clip.strategy == "keyframe"
    full = decode_all(path, 32)
    assert all(np.array_equal(frame, full[pts]) for frame, pts in zip(clip.frames, picks))  # bit-exact: the same frame as decoding through


def sliding_texture(n, height=32, width=64):
    """Noise sliding by a pixel a frame: cheap to predict, so the encoder adds no scene-cut keyframes."""
    texture = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(texture, i, axis=1) for i in range(n)])


def test_segments_without_a_keyframe_keep_their_exact_sample(tmp_path):
    path = write_video(tmp_path / "v.mp4", ramp(60), rate=10, gop=25)
    picks, _, _ = expected_keyframes(path, 6)
    fallback = [i for i, p in enumerate(picks) if p is None]
    assert fallback and len(fallback) < 6  # keyframes at frames 0 and 25 (and where the encoder saw a scene cut)
    exact, keyed = read_clip(path, 6, 32), read_clip(path, 6, 32, sampling="keyframe")
    for i in fallback:
        assert np.array_equal(keyed.frames[i], exact.frames[i]) and keyed.times[i] == exact.times[i]
    assert list(frame_index(exact.frames)) == [5, 15, 25, 35, 45, 55] and frame_index(keyed.frames)[0] == 0
    assert keyed.keyframes == 6 - len(fallback) and exact.keyframes == 0
    assert keyed.strategy in ("seek", "sequential")


def test_sparse_gop_video_decodes_one_frame_per_sample(tmp_path):
    path = write_video(tmp_path / "v.mp4", sliding_texture(300), rate=30, gop=30)  # 10 s, a keyframe every second
    exact, keyed = read_clip(path, 8, 16), read_clip(path, 8, 16, sampling="keyframe")
    assert keyed.keyframes == 8 and keyed.frames_decoded == 8
    assert exact.frames_decoded > 8 * 10  # each exact sample decodes from its GOP's start to mid-segment


@pytest.mark.parametrize("gop", [4, 7, 25, 250])
@pytest.mark.parametrize("num_frames", [3, 6, 16])
def test_keyframe_sampling_never_decodes_more_than_exact(tmp_path, gop, num_frames):
    """Keyframes that the exact samples' plan decodes anyway (its pass, or the GOP starts it seeks to) come from that plan."""
    path = write_video(tmp_path / "v.mp4", ramp(60), rate=10, gop=gop)
    exact, keyed = read_clip(path, num_frames, 32), read_clip(path, num_frames, 32, sampling="keyframe")
    assert keyed.frames_decoded <= exact.frames_decoded
    full = decode_all(path, 32)
    first = min(full)
    with av.open(str(path)) as container:
        tb = float(container.streams.video[0].time_base)
    assert all(np.array_equal(frame, full[round(t / tb) + first]) for frame, t in zip(keyed.frames, keyed.times))


def test_a_keyframe_that_does_not_decode_alone_falls_back_to_one_pass_with_the_same_frames(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", ramp(60), rate=10, gop=25)
    expected = read_clip(path, 6, 32, sampling="keyframe")

    def overshoot(*args):
        raise video._Overshoot

    monkeypatch.setattr(video, "_decode_keyframes", overshoot)
    clip = read_clip(path, 6, 32, sampling="keyframe")
    assert clip.strategy == "sequential" and np.array_equal(clip.frames, expected.frames) and clip.keyframes == 3


def test_keyframe_sampling_applies_the_display_rotation(tmp_path):
    path = write_video(tmp_path / "rot.mp4", ramp(8), rotation=90)
    clip = read_clip(path, 1, 32, sampling="keyframe")
    frame = clip.frames[0].astype(int)
    assert clip.keyframes == 1 and frame[:, :2].mean() > 200 and frame[:2, 8:].mean() < 150


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_raise_video_error_with_keyframe_sampling(tmp_path, kind):
    make, reason = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(VideoError) as info:
        read_clip(path, 4, 32, sampling="keyframe")
    assert str(info.value).startswith(f"{path}: ") and reason in info.value.reason


def test_unknown_sampling_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sampling must be"):
        read_clip(write_video(tmp_path / "v.mp4", ramp(4)), 2, 16, sampling="nearest")


def test_cmdcl_eval_sampling_keyframe_evaluates_keyframe_clips_cached_apart_from_exact_ones(tmp_path, make_model):
    import json

    import torch
    from click.testing import CliRunner

    from cmdcl.cli.eval import main as eval_cli
    from cmdcl.model import save_checkpoint

    model = make_model()  # 4 frames of 32 px
    save_checkpoint(model, tmp_path / "m.pt")
    videos = [write_video(tmp_path / f"v{i}.mp4", ramp(40)[i:], rate=10, gop=7) for i in range(2)]  # keyframes off the segment centres
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{v},{model.class_names[0]}\n" for v in videos))
    cache = tmp_path / "cache"
    runs = {}
    for sampling in ("exact", "keyframe"):
        before = set(cache.glob("clips-*.pt"))
        args = ["--ckpt", str(tmp_path / "m.pt"), "--data", str(manifest), "--cache-dir", str(cache), "--device", "cpu"]
        result = CliRunner().invoke(eval_cli, [*args, "--sampling", sampling, "--json", str(tmp_path / f"{sampling}.json")])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / f"{sampling}.json").read_text())["sampling"] == sampling
        (runs[sampling],) = set(cache.glob("clips-*.pt")) - before  # a cache of its own
    for sampling, path in runs.items():
        expected = np.stack([read_clip(v, 4, 32, sampling=sampling).frames for v in videos])
        assert np.array_equal(torch.load(path).numpy(), expected)
    assert not np.array_equal(torch.load(runs["exact"]).numpy(), torch.load(runs["keyframe"]).numpy())


def test_cmdcl_bench_measures_decoding_per_sample_for_both_samplings(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from cmdcl.cli.bench import main as bench_cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = CliRunner().invoke(bench_cli, ["--backend", "torch", "--frames", "4", "--classes", "3", "--iters", "1", "--warmup", "0",
                                            "--stages", "decode_video,end_to_end,decode_per_sample", "--sampling", "keyframe",
                                            "--long-minutes", "0.1", "--json", str(tmp_path / "b.json"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    records = {r["stage"]: r for r in report["records"]}
    assert set(records) == {"decode_video", "end_to_end",
                            *(f"decode_per_sample_{s}{v}" for s in ("exact", "keyframe") for v in ("", "_long"))}
    assert "keyframe sampling" in records["decode_video"]["note"] and "keyframe sampling" in records["end_to_end"]["note"]
    assert report["settings"]["sampling"] == "keyframe"
    assert records["decode_per_sample_keyframe"]["frames_per_sample"] == 1 < records["decode_per_sample_exact"]["frames_per_sample"]
    # 4 segments of 1.5 s of a video with a keyframe every 10 s: only the first holds one, on the exact samples' way
    assert records["decode_per_sample_keyframe_long"]["frames_per_sample"] == records["decode_per_sample_exact_long"]["frames_per_sample"]
    assert "(1 keyframes)" in records["decode_per_sample_keyframe_long"]["note"]
    assert {c["comparison"] for c in report["comparisons"]} == {f"keyframe vs exact sampling ({v} video)" for v in ("bench", "long")}
