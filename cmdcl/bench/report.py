"""cmdcl-bench output: what the measurements mean (ratios, fractions of peaks and of time), the table on stdout,
the JSON file, the latency plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FLOP_STAGES = {"frame_encoder": "frame_encoder", "head": "head", "intervention": "intervention_op", "clip": "clip"}  # stage: its floor


# ---- what the measurements mean -----------------------------------------------------------------------
def comparisons(records: list) -> list[dict]:
    """Ratios of p50 latencies (>1: the first named is faster):
    each backend vs PyTorch eager fp32 ("torch") on the same stage and batch; the stream update
    vs re-running the whole clip; a stream step with one window scale vs with n (the cost of the extra scales);
    N decoding workers vs 1; seek-based vs sequential decoding of the long video;
    keyframe vs full decoding of a stream grid, per GOP; keyframe vs exact sampling."""
    by_key = {(r.backend, r.stage, r.batch): r for r in records}
    out = []
    for r in records:
        base = by_key.get(("torch", r.stage, r.batch))
        if base and r.backend not in ("torch", "pyav"):
            out.append({"comparison": f"{r.backend} vs torch", "stage": r.stage, "batch": r.batch,
                        "speedup": round(base.p50_ms / r.p50_ms, 3)})
    for r in records:
        clip = by_key.get((r.backend, "clip", r.batch))
        if r.stage == "stream_update_model" and clip:  # model work per window: cached tokens vs all F frames again
            out.append({"comparison": "stream update (token cache) vs whole clip", "backend": r.backend, "batch": r.batch,
                        "speedup": round(clip.p50_ms / r.p50_ms, 3)})
    for r in records:  # "stream_scales_<n>[_model]": a stride step with n window scales vs one
        n, _, part = r.stage.removeprefix("stream_scales_").partition("_")
        one = by_key.get((r.backend, f"stream_scales_1{'_' + part if part else ''}", r.batch))
        if r.stage.startswith("stream_scales_") and n != "1" and one:
            where = "time in the model" if part else "wall, incl. decoding"
            out.append({"comparison": f"1 vs {n} window scales (stream step, {where})", "backend": r.backend, "batch": r.batch,
                        "speedup": round(r.p50_ms / one.p50_ms, 3)})
    for r in records:
        serial = by_key.get((r.backend, "end_to_end_serial", r.batch))
        if r.stage == "end_to_end_parallel" and serial:
            out.append({"comparison": "N decoding workers vs 1 (end to end)", "backend": r.backend, "batch": r.batch,
                        "speedup": round(serial.p50_ms / r.p50_ms, 3), "efficiency": r.pipeline_efficiency})
    seek, sequential = by_key.get(("pyav", "long_video_seek", 1)), by_key.get(("pyav", "long_video_sequential", 1))
    if seek and sequential:
        out.append({"comparison": "seek vs sequential (long video)", "stage": "long_video", "batch": 1,
                    "speedup": round(sequential.p50_ms / seek.p50_ms, 3)})
    grid_prefix = "stream_grid_keyframes_gop"  # records "stream_grid_{all,keyframes}_gop<GOP>s", GOP in seconds
    keyframe_grids = [r for r in records if r.stage.startswith(grid_prefix)]
    for r in sorted(keyframe_grids, key=lambda r: float(r.stage.removeprefix(grid_prefix).removesuffix("s"))):  # by GOP
        gop = r.stage.removeprefix(grid_prefix).removesuffix("s")
        full = by_key.get((r.backend, f"stream_grid_all_gop{gop}s", 1))
        if full:
            out.append({"comparison": f"keyframe grid vs full decoding (streams per core, GOP {gop} s)", "backend": r.backend,
                        "batch": 1, "speedup": round(full.p50_ms / r.p50_ms, 3)})
    for suffix, video in (("", "bench video"), ("_long", "long video")):
        exact, keyframe = (by_key.get(("pyav", f"decode_per_sample_{sampling}{suffix}", 1)) for sampling in ("exact", "keyframe"))
        if exact and keyframe:
            out.append({"comparison": f"keyframe vs exact sampling ({video})", "stage": "decode_per_sample", "batch": 1,
                        "speedup": round(exact.p50_ms / keyframe.p50_ms, 3)})
    return out


def add_floor_fractions(records: list, floors_by_batch: dict, peaks: dict) -> None:
    """Sets each model record's achieved FLOP/s against the FLOP floor (gflops_per_s), as a fraction of the measured
    GEMM peak; for whole clips also the byte floor per second against the measured copy bandwidth."""
    for r in records:
        part = FLOP_STAGES.get(r.stage)
        if part is None or r.batch not in floors_by_batch:
            continue
        floor = floors_by_batch[r.batch]
        achieved = floor["flops"][part] * r.batch / (r.p50_ms / 1e3)
        precision = "fp16" if ("fp16" in r.backend or "bf16" in r.backend or r.backend == "trt") else "fp32"
        peak = peaks.get(f"gemm_{precision}_flops") or peaks["gemm_fp32_flops"]
        r.gflops_per_s = round(achieved / 1e9, 3)
        r.peak_flops_fraction = round(achieved / peak, 4)
        if r.stage == "clip":
            r.floor_bytes_fraction = round(floor["bytes_per_clip"] * r.batch / (r.p50_ms / 1e3) / peaks["copy_bytes_per_s"], 4)


def pipeline_efficiency(serial_ms, serial_model_ms, parallel_ms, parallel_model_ms, workers: int) -> float:
    """How well N decoding workers overlap with the model, from the times (ms) of runs with 1 worker and with N: the
    larger of the decoding time / N (the serial runs' time outside the model) and the model time, over the parallel
    end-to-end time. 1.0 is perfect overlap."""
    decoding = np.median(np.subtract(serial_ms, serial_model_ms))
    return round(max(decoding / workers, np.median(parallel_model_ms)) / np.median(parallel_ms), 3)


def format_table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (headers, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"


def _percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _ratio(comparison: dict) -> str:
    """'1.82x', and the pipeline's efficiency where the comparison has one (decoding workers)."""
    efficiency = comparison.get("efficiency")
    return f"{comparison['speedup']:.2f}x" + ("" if efficiency is None else f" (pipeline efficiency {efficiency:.2f})")


PARTIAL = "interrupted: partial results (the run stopped before every stage and backend was measured)"


def text_report(report: dict) -> str:
    """Machine line, the records table, comparisons, floors and skipped stages."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({s['threads']} threads used), {m['memory_gb']} GB"
        + (f"; GPU {m['gpu']} (driver {m['driver']}, CUDA {m['cuda']})" if m.get("gpu") else "; no GPU"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"load average: {m['load_average']} at start, {m.get('load_average_end')} at end",
        f"model: F={s['num_frames']} frames at {s['image_size']} px, {s['num_classes']} classes"
        + (f" ({s['preset']} preset, random weights)" if not s["engines"] else f" ({', '.join(s['engines'])})"),
        *([PARTIAL] if report.get("interrupted") else []),
        "",
    ]
    rows = [[r["backend"], r["stage"], r["batch"], _num(r["p50_ms"]), _num(r["p90_ms"]), _num(r["p99_ms"]),
             f"{_num(r['throughput'])} {r['unit']}", _num(r["video_s_per_s"], 1), _num(r["peak_mem_mb"], 0),
             _num(r["device_mem_mb"], 0), _percent(r["peak_flops_fraction"]), r["iters"]] for r in report["records"]]
    lines.append(format_table(["backend", "stage", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput", "video s/s",
                               "host MB", "GPU MB", "of GEMM peak", "iters"], rows))
    if report["comparisons"]:
        lines += ["", "comparisons (ratio of p50 latencies; > 1: the first named is faster):"]
        for c in report["comparisons"]:
            where = c.get("stage") or c.get("backend")
            lines.append(f"  {c['comparison']}: {where}, batch {c['batch']}: {_ratio(c)}")
    for batch, floor in report["floors"].items():
        f = floor["flops"]
        lines.append(f"\nfloors per clip at batch {batch} (fp32 weights): {f['clip'] / 1e9:.2f} GFLOP (frame encoder "
                     f"{f['frame_encoder'] / 1e9:.2f}, head {f['head'] / 1e9:.3f}, intervention op {f['intervention_op'] / 1e9:.3f}), "
                     f"{floor['bytes_per_clip'] / 1e6:.1f} MB")
    peaks = report["measured_peaks"]
    lines.append("measured peaks: " + ", ".join(
        f"{k.removesuffix('_flops').removesuffix('_bytes_per_s')} {v / 1e9:.1f} G{'FLOP' if k.endswith('flops') else 'B'}/s"
        for k, v in peaks.items()))
    for skipped in report["skipped"]:
        lines.append(f"skipped: {skipped['backend']} {skipped['stage']}" + (f" batch {skipped['batch']}" if skipped["batch"] else "")
                     + f": {skipped['reason']}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The records and comparisons as Markdown tables (for benchmarks/RESULTS.md), headed by the machine and command."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {s['threads']} threads"
        + (f", {m['gpu']} (driver {m['driver']}, CUDA {m['cuda']})" if m.get("gpu") else ", no GPU")
        + f"; load average {m['load_average']} at start, {m.get('load_average_end')} at end. "
        + "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Command: `{report.get('command', 'cmdcl-bench')}`",
        *(["", f"**{PARTIAL}**"] if report.get("interrupted") else []),
        "",
        "| backend | stage | batch | p50 ms | p90 ms | p99 ms | throughput | video s/s | peak host MB | of GEMM peak | iters |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        fraction = _percent(r["peak_flops_fraction"])
        lines.append(f"| {r['backend']} | {r['stage']} | {r['batch']} | {_num(r['p50_ms'])} | {_num(r['p90_ms'])} | "
                     f"{_num(r['p99_ms'])} | {_num(r['throughput'])} {r['unit']} | {_num(r['video_s_per_s'], 1)} | "
                     f"{_num(r['peak_mem_mb'], 0)} | {fraction} | {r['iters']} |")
    if report["comparisons"]:
        lines += ["", "| comparison | stage / backend | batch | ratio of p50 (>1: first is faster) |", "|---|---|---|---|"]
        for c in report["comparisons"]:
            lines.append(f"| {c['comparison']} | {c.get('stage') or c.get('backend')} | {c['batch']} | {_ratio(c)} |")
    return "\n".join(lines) + "\n"


def plot_latency(report: dict, path) -> Path:
    """Horizontal bars of p50 latency (log scale, p90 as the error bar) per stage, one colour per backend, one panel
    per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    batches = sorted({r["batch"] for r in records})
    backends = list(dict.fromkeys(r["backend"] for r in records))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 1 + 0.45 * len({r["stage"] for r in records}) * 1.5),
                             squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in records if r["batch"] == batch]
        stages = list(dict.fromkeys(r["stage"] for r in rows))
        height = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            mine = {r["stage"]: r for r in rows if r["backend"] == backend}
            ys = [stages.index(st) + i * height for st in stages if st in mine]
            p50 = [mine[st]["p50_ms"] for st in stages if st in mine]
            spread = [mine[st]["p90_ms"] - mine[st]["p50_ms"] for st in stages if st in mine]
            if ys:
                ax.barh(ys, p50, height=height, xerr=[[0] * len(spread), spread], label=backend, color=f"C{i % 10}")
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(stages))], stages)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (p50; bar to p90)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize="small")
    m = report["machine"]
    fig.suptitle(f"cmdcl-bench: {m['gpu'] or m['cpu']}, {report['settings']['threads']} threads", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
