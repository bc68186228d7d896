"""Files whose timestamps restart or run backwards partway (MPEG-TS segments joined with `cat`, spliced
recordings): every part is sampled, on one timeline that continues across the restarts, in video mode and in
stream mode (whose grid also ends at the last part, and whose reopened HTTP source resumes where it was)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cmdcl.cli.run import main
from cmdcl.data.video import Reconnect, VideoError, iter_grid_frames, read_clip, write_video
from test_runtime import serve_video, tiny_checkpoint  # noqa: F401  (fixture)
from test_video import frame_index, ramp

PART_FRAMES, RATE, PARTS = 20, 10, 3  # three 2 s parts at 10 fps: frame i of the whole file has grey level 4 * i


def write_parts(directory, starts):
    """One MPEG-TS file per part, part p holding frames p * PART_FRAMES ... of the ramp, its timestamps
    starting at starts[p] seconds; returns the parts' paths."""
    frames = ramp(PART_FRAMES * len(starts))
    return [write_video(directory / f"part{p}.ts", frames[p * PART_FRAMES : (p + 1) * PART_FRAMES], rate=RATE, gop=5,
                        times=start + np.arange(PART_FRAMES) / RATE)
            for p, start in enumerate(starts)]


def joined(directory, starts, name="joined.ts"):
    """The parts concatenated byte by byte, as `cat part*.ts > joined.ts` does."""
    path = directory / name
    path.write_bytes(b"".join(part.read_bytes() for part in write_parts(directory, starts)))
    return path


CASES = {"restart at the same time": [0.0, 0.0, 0.0],  # each segment's clock starts again
         "backwards partway": [10.0, 3.0, 1.0]}  # spliced recordings: each starts before the one before it ended


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampling", ["exact", "keyframe"])
def test_every_part_is_sampled_on_one_timeline(tmp_path, case, sampling):
    path = joined(tmp_path, CASES[case])
    clip = read_clip(path, 6, 32, sampling=sampling)
    assert clip.restarts == PARTS - 1
    assert clip.duration == pytest.approx(PARTS * PART_FRAMES / RATE)  # 6 s, not one part's 2 s
    assert np.allclose(clip.times, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    # each segment's centre frame (every 5th frame is a keyframe, so keyframe sampling takes the same ones)
    assert frame_index(clip.frames).tolist() == [5, 15, 25, 35, 45, 55]


@pytest.mark.parametrize("strategy", ["auto", "seek"])
def test_a_file_with_restarts_is_decoded_in_one_pass(tmp_path, strategy):
    """Seeking to a timestamp several parts hold would land in the wrong part: whatever was asked, one pass."""
    clip = read_clip(joined(tmp_path, CASES["restart at the same time"]), 4, 32, strategy=strategy)
    assert clip.strategy == "sequential" and frame_index(clip.frames).tolist() == [7, 22, 37, 52]


def test_one_part_has_no_restarts(tmp_path):
    [part] = write_parts(tmp_path, [5.0])
    clip = read_clip(part, 4, 32)
    assert clip.restarts == 0 and clip.duration == pytest.approx(2.0)
    assert frame_index(clip.frames).tolist() == [2, 7, 12, 17]


def test_cmdcl_run_records_the_whole_duration_and_the_restarts(tmp_path, tiny_checkpoint):  # noqa: F811
    path = joined(tmp_path, CASES["backwards partway"])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, [str(path), "--engine", str(tiny_checkpoint), "-o", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["end"] == pytest.approx(6.0) and record["timestamp_restarts"] == 2


class Packet:
    """What _Restarts reads of a demuxed packet."""

    def __init__(self, pts, dts=None, key=False):
        self.pts, self.dts, self.is_keyframe = pts, dts, key


@pytest.mark.parametrize("packets, parts", [
    # dts going back: a restart, whatever the keyframes
    ([Packet(0, 0, True), Packet(3, 1), Packet(1, 2), Packet(2, 3), Packet(0, 0, True), Packet(3, 1)], [0, 0, 0, 0, 1, 1]),
    # no dts (Matroska, raw streams): a keyframe not after every pts before it is a restart...
    ([Packet(0, key=True), Packet(1), Packet(2), Packet(2, key=True), Packet(3)], [0, 0, 0, 1, 1]),
    ([Packet(10, key=True), Packet(11), Packet(5, key=True), Packet(6)], [0, 0, 1, 1]),
    # ...but B-frames' pts going back in decode order are not, with or without dts
    ([Packet(0, key=True), Packet(3), Packet(1), Packet(2), Packet(6), Packet(4), Packet(5), Packet(7, key=True)], [0] * 8),
    ([Packet(0, 0, True), Packet(3, 1), Packet(1, 2), Packet(2, 3), Packet(4, 4, True)], [0] * 5),
])
def test_restarts_are_found_in_decode_order(packets, parts):
    from cmdcl.data.video import _Restarts

    restarts = _Restarts()
    assert [restarts.part(packet) for packet in packets] == parts


# ---- stream mode ------------------------------------------------------------------------------------------------
GRID_RATE = 1.6  # max_gap is 2 s, and a restart goes back 1.9 s: not a gap; the 0.5 s GOPs are dense enough for the keyframe grid


@pytest.mark.parametrize("keyframes", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_stream_grid_runs_over_every_part_once(tmp_path, case, keyframes):
    """Each part continues the grid after the frame on screen: no part is laid over the grid times of the one before
    (a restart shorter than a gap used to be, so the grid never got past the first part's 2 s), and the grid ends at
    the last part's last frame (the keyframe grid used to run on to the largest pts of any part: 14 s, not 6 s)."""
    grid = list(iter_grid_frames(joined(tmp_path, CASES[case]), GRID_RATE, 32, keyframes=keyframes))
    times, shown = np.array([t for t, _ in grid]), frame_index(np.stack([frame for _, frame in grid]))
    assert np.allclose(np.diff(times), 1 / GRID_RATE)
    assert PARTS * PART_FRAMES / RATE - 0.5 <= times[-1] <= PARTS * PART_FRAMES / RATE
    assert np.all(np.diff(shown) >= 0) and shown[-1] >= PARTS * PART_FRAMES - 5  # every part, in order, to the last GOP


def test_reopened_http_source_with_restarts_resumes_without_replaying(tmp_path):
    """An HTTP file whose connection drops half way each time: a reopened source skips what it read, by position
    in the file, not by pts (which a later part repeats: each reconnect replayed part one, as progress, for ever)."""
    data = joined(tmp_path, CASES["restart at the same time"]).read_bytes()
    server, url, connections = serve_video(data, ["drop"] * 100)
    grid = []
    try:
        with pytest.raises(VideoError, match="gave up after 2 reconnects without progress"):
            for item in iter_grid_frames(url, 10, 32, Reconnect(tries=2, initial_delay=0.01), sleep=lambda _: None):
                grid.append(item)
    finally:
        server.shutdown()
    assert len(connections) == 4  # the first read, and three reconnects without progress
    shown = frame_index(np.stack([frame for _, frame in grid]))
    assert np.all(np.diff(shown) >= 0) and shown[-1] > PART_FRAMES  # into the second part, nothing replayed
