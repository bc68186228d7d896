"""The keyframe grid (stream mode, `--decode keyframes`) with every codec family the bundled FFmpeg decodes
(issue 21, item 1): H.264, HEVC, VP9, AV1 (libdav1d), MPEG-4 Part 2 and MJPEG, closed and open GOPs, read
from a file and over HTTP. Each grid frame must be what the design promises against full decoding
(`--decode all`): the same grid times and windows; a grid frame decoded keyframes-only is the keyframe
nearest its time, any other is the frame full decoding shows then.

Dense keyframes (every 0.3 s, under the 0.5 s grid step) keep the grid on keyframes only. Sparse ones (GOPs of
0.4, 0.3 and 0.4 s, then one of 1.9 s, three times over) make it fall back to full decoding mid-GOP three times, and
a fourth time at the keyframe (10.7 s) ending a GOP of 0.6 s whose other frames all came within the 0.55 s allowed.
In the open GOPs, the keyframes where the grid turns to keyframes only (0.7 s after a cycle's start) and those of
the GOPs it falls back in (1.1 s after) have leading frames on grid times.

Video mode (both samplings) reads the same files and URLs: each sample is the frame full decoding shows."""

import http.server
import json
import re
import threading

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cmdcl.cli.run import main as run_main
from cmdcl.data.video import GridStatus, Reconnect, frame_to_rgb, iter_grid_frames
from cmdcl.runtime import Recognizer
from test_runtime import moving_square, tiny_checkpoint  # noqa: F401  (fixture)
from test_stream_readers import encode_keyed
from test_stream_reliability import EchoBackend

RATE = 10  # frames per second of the test videos
GRID = 2.0  # grid frames per second: EchoBackend's 4 frames over a 2 s window
SIZE = 32
DENSE = (40, set(range(0, 40, 3)))  # (frames, keyframe indices)
SPARSE = (120, {c + k for c in (0, 30, 60) for k in (0, 4, 7, 11)} | {90, 94, 97, 101, 107})
# codec family: (encoder, container, encoder options, pixel format)
CODECS = {
    "h264": ("libx264", "mp4", {"forced-idr": "1", "x264-params": "scenecut=0"}, "yuv420p"),
    "h264-open-gop": ("libx264", "mkv", {"x264-params": "open-gop=1:scenecut=0:min-keyint=1:bframes=3"}, "yuv420p"),
    "hevc": ("libx265", "mp4", {"forced-idr": "1", "x265-params": "scenecut=0:log-level=error"}, "yuv420p"),
    "hevc-open-gop": ("libx265", "mkv", {"x265-params": "open-gop=1:scenecut=0:min-keyint=1:bframes=3:log-level=error"}, "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", {}, "yuv420p"),
    "av1": ("libsvtav1", "mp4", {"svtav1-params": "log-level=1"}, "yuv420p"),  # decoded by libdav1d
    "mpeg4": ("mpeg4", "avi", {"sc_threshold": "1000000000"}, "yuv420p"),
    "mjpeg": ("mjpeg", "avi", {}, "yuvj420p"),  # all intra: every frame a keyframe
}
OPEN_GOP = {"h264-open-gop", "hevc-open-gop"}  # frames shown before a keyframe (leading frames) need the GOP before it
CASES = [(codec, layout) for codec in CODECS for layout in ("dense", "sparse") if codec != "mjpeg" or layout == "dense"]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's `files` ({"/name": bytes}) with byte ranges, as a web server serves video files."""

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data) - 1
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start, end = int(wanted[1]), min(int(wanted[2] or end), end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        try:
            self.wfile.write(data[start : end + 1])
        except (BrokenPipeError, ConnectionResetError):  # the reader seeks elsewhere and drops this connection
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """{(codec, layout): (file, its URL on a loopback HTTP server)}, encoded once."""
    folder = tmp_path_factory.mktemp("codecs")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.daemon_threads = True
    server.files = {}
    made = {}
    for codec, layout in CASES:
        encoder, suffix, options, pix_fmt = CODECS[codec]
        count, keyframes = DENSE if layout == "dense" else SPARSE  # a square moving over noise
        path = encode_keyed(folder / f"{codec}-{layout}.{suffix}", moving_square(count, 1, 48, 64), keyframes, RATE, encoder, options,
                            pix_fmt)
        server.files[f"/{path.name}"] = path.read_bytes()
        made[codec, layout] = path, f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield made
    server.shutdown()


def grid(source, keyframes):
    """[(t, image, decode)] and the GridStatus at the end."""
    status = GridStatus()
    reconnect = Reconnect(tries=0)  # a failing HTTP read fails the test instead of being retried
    frames = [(t, image, status.decode) for t, image in iter_grid_frames(source, GRID, SIZE, reconnect, keyframes=keyframes, status=status)]
    return frames, status


def keyframe_images(path):
    """{time: image} of the keyframes, times as the grid counts them (from the first frame decoded)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keys = {p.pts for p in container.demux(stream) if p.is_keyframe and p.size and p.pts is not None}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return {float((f.pts - frames[0].pts) * stream.time_base): frame_to_rgb(f, SIZE) for f in frames if f.pts in keys}


def nearest(times, t):
    """The time in `times` nearest t, the earlier on a tie."""
    return min(times, key=lambda k: (abs(k - t), k))


@pytest.mark.parametrize("codec, layout", CASES)
def test_keyframe_grid_gives_what_full_decoding_promises_for_every_codec(videos, codec, layout):
    path, url = videos[codec, layout]
    full, full_status = grid(path, keyframes=False)
    count = (DENSE if layout == "dense" else SPARSE)[0]
    assert len(full) == count // (RATE / GRID) and full_status.frames_decoded == count
    keys = keyframe_images(path)
    for source in (path, url):
        frames, status = grid(source, keyframes=True)  # a false "truncated" or any other error fails here
        assert [t for t, _, _ in frames] == [t for t, _, _ in full]  # the same grid: the same windows
        for (t, image, decode), (_, on_screen, _) in zip(frames, full):
            expected = keys[nearest(keys, t)] if decode == "keyframes" else on_screen
            assert np.array_equal(image, expected), (source, t, decode)
        decodes = [d for _, _, d in frames]
        fallbacks = sum(a == "keyframes" and b == "all" for a, b in zip(decodes, decodes[1:]))
        if codec == "mjpeg":  # nothing to skip: every frame decoded, as full decoding does
            assert status.frames_decoded == count and decodes[1:] == ["all"] * (len(frames) - 1)
        elif codec in OPEN_GOP:  # a GOP's leading frames come after the next keyframe: some GOPs look all-intra, and are decoded
            assert "keyframes" in decodes and fallbacks >= 1 and status.frames_decoded < count
        elif layout == "dense":
            assert decodes == ["keyframes"] * len(frames) and status.frames_decoded == len(keys)
        else:  # keyframes only, then every frame: four times
            assert fallbacks == 4 and len(keys) < status.frames_decoded < count
        full_http, _ = grid(url, keyframes=False)
        assert [(t, d) for t, _, d in full_http] == [(t, d) for t, _, d in full]
        assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(full_http, full))


@pytest.mark.parametrize("codec", ["av1", "vp9", "hevc-open-gop"])
def test_stream_windows_with_sparse_keyframes_match_full_decoding(videos, codec):
    """The recogniser's windows (EchoBackend: a window's logits are its frames' mean colour), file and HTTP."""
    path, url = videos[codec, "sparse"]

    def windows(source, keyframe_grid):
        recognizer = Recognizer(EchoBackend(), window=2.0, stride=1.0, keyframe_grid=keyframe_grid, reconnect=Reconnect(tries=0))
        records = list(recognizer.stream(source))
        assert records[-1]["summary"] and "error" not in records[-1]
        return [(r["start"], r["end"]) for r in records[:-1]], records[-1]["windows"]

    expected = windows(path, False)
    assert expected[1] == (SPARSE[0] // (RATE / GRID) - 4) // 2 + 1  # 24 grid frames, 4 a window, 2 a stride
    assert windows(path, True) == windows(url, True) == windows(url, False) == expected


def test_cmdcl_run_stream_av1_with_sparse_keyframes_gives_the_windows_of_full_decoding(videos, tiny_checkpoint):  # noqa: F811
    """End to end: `cmdcl-run --mode stream` on the AV1 file and URL, keyframe grid against `--decode all`."""
    path, url = videos["av1", "sparse"]

    def summary(source, *options):
        result = CliRunner().invoke(run_main, [source, "--engine", str(tiny_checkpoint), "--mode", "stream", "--window", "2",
                                               "--stride", "1", *options])
        assert result.exit_code == 0, result.output
        [record] = [r for r in map(json.loads, re.findall(r"^\{.*$", result.output, re.M)) if r.get("summary")]
        return record

    full = summary(str(path), "--decode", "all")
    assert full["windows"] == 11
    for source in (str(path), url):
        record = summary(source)
        assert "error" not in record and record["windows"] == full["windows"] and record["end"] == full["end"]


@pytest.mark.parametrize("codec, layout", CASES)
def test_video_mode_samples_what_full_decoding_shows_for_every_codec(videos, codec, layout):
    """Video mode on the same files and URLs, both samplings: every sample is the frame full decoding shows at its
    time; with keyframe sampling, each segment holding a keyframe shows the one nearest its centre."""
    from cmdcl.data.video import read_clip, segment_times
    from test_keyframe_sampling import decode_all, expected_keyframes

    path, url = videos[codec, layout]
    full = decode_all(path, SIZE)  # {pts: image}
    picks, tb, first = expected_keyframes(path, 8)
    for sampling in ("exact", "keyframe"):
        clips = [read_clip(source, 8, SIZE, sampling=sampling) for source in (path, url)]
        for clip in clips:
            centres = segment_times(clip.duration, 8)
            for image, t, key, centre in zip(clip.frames, clip.times, picks, centres):
                shown = max(pts for pts in full if pts <= first + centre / tb + 1e-6)  # on screen at the segment's centre
                expected = key if sampling == "keyframe" and key is not None else shown
                assert round(t / tb) == expected - first and np.array_equal(image, full[expected]), (sampling, t)
        assert np.array_equal(clips[0].frames, clips[1].frames) and clips[0].frames_decoded == clips[1].frames_decoded
