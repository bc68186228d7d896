"""Does the test suite catch deliberate bugs? A mutation check over sampling, the stream grid, drops, gaps, bounds,
outputs and the serving front (issue 21): each mutation below changes one line of the package the way a plausible bug would, the tests
named with it run against the changed copy, and the mutation counts as caught when they fail.

    .venv/bin/python benchmarks/mutation_check.py [--only SUBSTRING] [--json results.json]

Runs in a scratch git worktree of HEAD (the checkout is never touched), one mutation at a time, each test run cut off
after --timeout seconds (a run cut off counts as caught: a hang is a failure the suite's deadlines report). Prints a
table and exits 1 if any mutation survives, or if a mutation's line is no longer in the code (update the list).
The tests of each mutation are the modules that exercise its code; all of them are part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    area: str
    what: str  # the bug, in words
    path: str
    old: str  # must occur exactly once in `path`
    new: str
    tests: tuple


VIDEO, RECOGNIZER, READERS = "cmdcl/data/video.py", "cmdcl/runtime/recognizer.py", "cmdcl/runtime/stream_readers.py"
ARTIFACTS = "cmdcl/artifacts.py"
GRID_TESTS = ("tests/test_grid_edges.py", "tests/test_stream_reliability.py", "tests/test_grid_codecs.py", "tests/test_multiscale.py")
MUTATIONS = [
    # ---- video mode sampling
    Mutation("sampling", "segment sample a quarter into its segment, not its centre", VIDEO,
             "within = np.full(num_frames, 0.5)", "within = np.full(num_frames, 0.25)", ("tests/test_video.py",)),
    Mutation("sampling", "the frame one interval after the sample time, not the one on screen", VIDEO,
             "scan.first + t / tb + 1e-9", "scan.first + (t + scan.interval) / tb + 1e-9",
             ("tests/test_video.py", "tests/test_keyframe_sampling.py")),
    Mutation("sampling", "duration without the last frame's interval", VIDEO,
             "duration = (scan.frame_pts[-1] - scan.first) * tb + scan.interval", "duration = (scan.frame_pts[-1] - scan.first) * tb",
             ("tests/test_video.py", "tests/test_keyframe_sampling.py")),
    Mutation("sampling", "a segment's first keyframe, not the one nearest its centre", VIDEO,
             "min(inside, key=lambda k: abs(key_times[k] - t))", "min(inside)", ("tests/test_keyframe_sampling.py",)),
    Mutation("sampling", "a keyframe on a segment's end counts in that segment", VIDEO,
             "bisect.bisect_left(key_times, (i + 1) * step)", "bisect.bisect_right(key_times, (i + 1) * step)",
             ("tests/test_keyframe_sampling.py", "tests/test_decode_counts.py")),
    Mutation("sampling", "parts after a timestamp restart do not continue the time line", VIDEO,
             "self.offsets[-1] + max(previous) + step - min(part)", "self.offsets[-1]", ("tests/test_timestamp_restarts.py",)),
    Mutation("sampling", "a file with restarts is sought into (ambiguous pts)", VIDEO,
             "    if scan.timeline.restarts:\n        strategy = \"sequential\"", "    if False:\n        strategy = \"sequential\"",
             ("tests/test_timestamp_restarts.py",)),
    Mutation("sampling", "restarts found only by dts (streams without dts, or a keyframe at the same pts, missed)", VIDEO,
             "if dts_back or (packet.is_keyframe and self.latest_pts is not None and packet.pts <= self.latest_pts):",
             "if dts_back:", ("tests/test_timestamp_restarts.py",)),
    Mutation("sampling", "seek cost counts one frame too many per target", VIDEO,
             "cost += index[target] - position", "cost += index[target] - position + 1",
             ("tests/test_decode_counts.py", "tests/test_video.py")),
    Mutation("sampling", "a tie between the two plans goes to seeking", VIDEO,
             "strategy = \"seek\" if seek_cost < sequential_cost else \"sequential\"",
             "strategy = \"seek\" if seek_cost <= sequential_cost else \"sequential\"",
             ("tests/test_decode_counts.py", "tests/test_video.py")),
    Mutation("sampling", "the final crop from the top-left corner, not the centre", VIDEO,
             "    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2", "    top, left = 0, 0",
             ("tests/test_video.py", "tests/test_frame_crop.py")),
    Mutation("sampling", "display rotation applied the wrong way", VIDEO,
             "np.rot90(image, k=turns)", "np.rot90(image, k=-turns)", ("tests/test_video.py",)),
    Mutation("sampling", "a very wide frame cropped from its left edge", VIDEO,
             "top, left = (image.shape[0] - short) // 2, (image.shape[1] - short) // 2", "top, left = 0, 0", ("tests/test_frame_crop.py",)),
    # ---- the stream grid
    Mutation("grid", "a keyframe tie goes to the later keyframe", VIDEO,
             "show_held((held_t + t) / 2 if nearest else t, inclusive=nearest)",
             "show_held((held_t + t) / 2 if nearest else t, inclusive=False)",
             GRID_TESTS),
    Mutation("grid", "after a backward jump the time line is not shifted", VIDEO,
             "shift, t = shift + held_t - t, held_t", "t = held_t", ("tests/test_stream_reliability.py", "tests/test_grid_edges.py")),
    Mutation("grid", "keyframes-only mode needs one short GOP more", VIDEO,
             "self.dense >= KEYFRAME_GOPS", "self.dense >= KEYFRAME_GOPS + 1", GRID_TESTS + ("tests/test_stream_readers.py",)),
    Mutation("grid", "keyframes count as dense up to two grid steps apart", VIDEO,
             "self.limit = step * (1 + KEYFRAME_SLACK)", "self.limit = step * 2", GRID_TESTS + ("tests/test_stream_readers.py",)),
    Mutation("grid", "keyframes-only: the grid stops at the last keyframe, not at the last frame", VIDEO,
             "end = max(held_t, shift + (gate.gop_end - first) * tb)", "end = held_t", GRID_TESTS + ("tests/test_stream_readers.py",)),
    Mutation("grid", "a window's F positions at the starts of their segments, not the centres", ARTIFACTS,
             "return [(2 * j + 1) * span // (2 * num_frames) for j in range(num_frames)]",
             "return [j * span // num_frames for j in range(num_frames)]", GRID_TESTS + ("tests/test_artifacts.py",)),
    Mutation("grid", "a window is due one frame after its stride", RECOGNIZER,
             "self.fresh or self.new >= stride_frames", "self.fresh or self.new > stride_frames", GRID_TESTS),
    Mutation("grid", "a window record ends at its last frame's time, not one grid step later", RECOGNIZER,
             "\"end\": round(last.t + step, 3)", "\"end\": round(last.t, 3)", GRID_TESTS + ("tests/test_cli_run.py",)),
    Mutation("grid", "timestamps restarting by less than a gap lay a part over the one before", VIDEO,
             "(t < held_t - gap or (frame.key_frame and t < held_t))", "t < held_t - gap",
             ("tests/test_timestamp_restarts.py", "tests/test_stream_reliability.py")),
    Mutation("grid", "a reopened HTTP file replays the frames already read", VIDEO,
             "skip = 0 if endless else frames_read", "skip = 0", ("tests/test_timestamp_restarts.py", "tests/test_stream_reliability.py")),
    # ---- gaps
    Mutation("gaps", "the longest bridged jump is the shorter of 3 steps and 2 s", VIDEO,
             "return max(GAP_GRID_STEPS / rate, GAP_SECONDS)", "return min(GAP_GRID_STEPS / rate, GAP_SECONDS)", GRID_TESTS),
    Mutation("gaps", "the grid restarts at the grid time before the frame after a gap", VIDEO,
             "grid_index = max(grid_index, math.ceil(t * rate - 1e-6))", "grid_index = max(grid_index, math.floor(t * rate))", GRID_TESTS),
    Mutation("gaps", "a part shorter than a window before a gap gets no window", RECOGNIZER,
             "(self.ended or self.after_gap is not None)", "self.ended", GRID_TESTS),
    Mutation("gaps", "gap_before counts the grid step before the gap too", RECOGNIZER,
             "round(item.t - self.last_time - step, 3)", "round(item.t - self.last_time, 3)", GRID_TESTS),
    # ---- drops
    Mutation("drops", "dropped frames taken for a gap", RECOGNIZER,
             "item.t - self.last_time > (item.dropped + 1.5) * step", "item.t - self.last_time > 1.5 * step",
             ("tests/test_drops.py", "tests/test_stream_readers.py")),
    Mutation("drops", "every window length reports all drops since the start", RECOGNIZER,
             "\"dropped\": self.dropped_total - self.dropped_before[k]", "\"dropped\": self.dropped_total",
             ("tests/test_drops.py", "tests/test_multiscale.py")),
    Mutation("drops", "files drop frames like live sources", RECOGNIZER,
             "drop_after = 1.0 / self.grid_rate if is_endless(source) else None", "drop_after = 1.0 / self.grid_rate",
             ("tests/test_drops.py", "tests/test_stream_readers.py")),
    Mutation("drops", "cascading drops lose the count the dropped frame carried", READERS,
             "(self.items[0] if self.items else item).dropped += oldest.dropped + 1",
             "(self.items[0] if self.items else item).dropped += 1", ("tests/test_drops.py", "tests/test_stream_readers.py")),
    Mutation("drops", "the newest frame is dropped, not the oldest", READERS,
             "oldest = self.items.popleft()", "oldest = self.items.pop()", ("tests/test_drops.py", "tests/test_stream_readers.py")),
    # ---- bounds
    Mutation("bounds", "the stride truncated to grid frames, not rounded", ARTIFACTS,
             "max(1, round(stride_seconds * grid_rate))", "max(1, int(stride_seconds * grid_rate))",
             ("tests/test_grid_edges.py", "tests/test_artifacts.py", "tests/test_multiscale.py")),
    Mutation("bounds", "window spans truncated, not rounded", ARTIFACTS,
             "spans = tuple(round(num_frames * scale / scales[0]) for scale in scales)",
             "spans = tuple(int(num_frames * scale / scales[0]) for scale in scales)",
             ("tests/test_grid_edges.py", "tests/test_multiscale.py")),
    Mutation("bounds", "a grid of exactly the largest rate refused", ARTIFACTS,
             "if num_frames / scales[0] > MAX_GRID_RATE:", "if num_frames / scales[0] >= MAX_GRID_RATE:",
             ("tests/test_limits.py", "tests/test_grid_edges.py")),
    Mutation("bounds", "a ring of exactly the largest size refused", ARTIFACTS,
             "if scales[-1] / scales[0] * num_frames > MAX_RING_FRAMES:", "if scales[-1] / scales[0] * num_frames >= MAX_RING_FRAMES:",
             ("tests/test_limits.py", "tests/test_grid_edges.py")),
    Mutation("bounds", "a recorded sampling value at its upper limit refused", "cmdcl/model/config.py",
             "or isinstance(value, bool) or not low <= value <= high:", "or isinstance(value, bool) or not low <= value < high:",
             ("tests/test_limits.py",)),
    Mutation("bounds", "NaN accepted by the finite-float options", "cmdcl/cli/options.py",
             "if math.isnan(number):", "if False:", ("tests/test_option_bounds.py",)),
    Mutation("bounds", "the items of a comma list (--window 8,32) not checked against their bounds", "cmdcl/cli/options.py",
             "items.append(self.item.convert(text, param, ctx))", "items.append(float(text))", ("tests/test_option_bounds.py",)),
    # ---- outputs
    Mutation("outputs", "an output may be an input", "cmdcl/output_files.py",
             "        for other, other_path in inputs:\n            if same_file(path, other_path):",
             "        for other, other_path in inputs:\n            if False:", ("tests/test_output_safety.py",)),
    Mutation("outputs", "a model's split graphs are not protected", ARTIFACTS,
             "files += [(f\"{name}'s {role} graph\", graph_path(model_path, role)) for role in SPLIT_ROLES]", "pass",
             ("tests/test_output_safety.py",)),
    Mutation("outputs", "a symlinked model's companions named after the link", ARTIFACTS,
             "return Path(os.path.realpath(model_path)) if model_path.is_symlink() else model_path", "return model_path",
             ("tests/test_output_safety.py",)),
    Mutation("outputs", "outputs may go into cmdcl's cache and assets", "cmdcl/output_files.py",
             "if real_path(path).is_relative_to(real_path(folder)):", "if False:", ("tests/test_output_safety.py",)),
    Mutation("outputs", "a damaged demo cache is used as it is", "cmdcl/runtime/backends.py",
             "if intact is None or intact != _read_record(target):", "if intact is None:", ("tests/test_output_safety.py",)),
    Mutation("outputs", "a file output written in place, not through a temporary file", "cmdcl/output_files.py",
             "    tmp = temporary_path(path)\n", "    tmp = Path(path)\n", ("tests/test_output_safety.py", "tests/test_cli_run.py")),
    Mutation("outputs", "an existing .partial file is overwritten", "cmdcl/runtime/output.py",
             "os.O_WRONLY | os.O_CREAT | os.O_EXCL", "os.O_WRONLY | os.O_CREAT | os.O_TRUNC",
             ("tests/test_output_safety.py", "tests/test_cli_run.py")),
    Mutation("outputs", "a record with an infinite score written with its labels", "cmdcl/runtime/output.py",
             "if any(isinstance(score, float) and not math.isfinite(score) for score in scores):",
             "if any(isinstance(score, float) and math.isnan(score) for score in scores):", ("tests/test_nonfinite_scores.py",)),
    Mutation("outputs", "only NaN logits make a row broken, not infinite ones", "cmdcl/runtime/backends.py",
             "broken = ~np.isfinite(logits).all(axis=-1, keepdims=True)", "broken = np.isnan(logits).any(axis=-1, keepdims=True)",
             ("tests/test_nonfinite_scores.py",)),
    Mutation("outputs", "JSON reports keep NaN (written as NaN, not null)", "cmdcl/output_files.py",
             "if isinstance(item, float) and not math.isfinite(item):\n            return None",
             "if False:\n            return None",
             ("tests/test_training_diverged.py", "tests/test_option_bounds.py", "tests/test_train.py")),
    # ---- the serving front
    Mutation("serving", "a declared batch of 2^32 or more reaches Triton", "cmdcl/serve/front.py",
             "0 <= d < DIM_LIMIT", "0 <= d", ("tests/test_serve_hostile.py",)),
    Mutation("serving", "slow clients holding every connection are never evicted", "cmdcl/serve/front.py",
             "            self.evict()\n", "            pass\n", ("tests/test_serve_hostile.py",)),
]


def run_tests(tree: Path, tests: tuple, timeout: float) -> tuple[str, float]:
    """('caught' | 'survived', seconds) of the tests run in `tree`."""
    # the serving tests run the serving venv of this checkout (the scratch tree has none); PYTHONPATH makes it import the tree
    env = {"CMDCL_SERVE_VENV": str(ROOT / ".venv-serve"), **os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        outcome = "survived" if result.returncode == 0 else "caught"
        if result.returncode not in (0, 1):  # 2-5: an error collecting or running pytest, not a failing test
            outcome = f"error (pytest exit {result.returncode})"
    except subprocess.TimeoutExpired:
        outcome = "caught (timed out)"
    return outcome, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose description or area contains this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.what or args.only == m.area]
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="cmdcl-mutation-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"], cwd=ROOT, check=True)
        try:
            baseline, seconds = run_tests(tree, tuple(sorted({t for m in chosen for t in m.tests})), args.timeout * 4)
            print(f"unmutated: the tests {'pass' if baseline == 'survived' else 'FAIL'} ({seconds:.0f} s)", flush=True)
            if baseline != "survived":
                return 1
            for i, mutation in enumerate(chosen, 1):
                path = tree / mutation.path
                original = path.read_text()
                if original.count(mutation.old) != 1:
                    outcome, seconds = f"stale: the line occurs {original.count(mutation.old)} times", 0.0
                else:
                    path.write_text(original.replace(mutation.old, mutation.new))
                    try:
                        outcome, seconds = run_tests(tree, mutation.tests, args.timeout)
                    finally:
                        path.write_text(original)
                failed |= not outcome.startswith("caught")
                results.append({"area": mutation.area, "mutation": mutation.what, "file": mutation.path, "outcome": outcome,
                                "seconds": round(seconds, 1), "tests": list(mutation.tests)})
                print(f"{i:3d} {mutation.area:9s} {outcome:20s} {seconds:6.0f} s  {mutation.what}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    caught = sum(r["outcome"].startswith("caught") for r in results)
    print(f"{caught} of {len(results)} mutations caught")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
