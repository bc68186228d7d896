"""cmdcl-bench: runs on a tiny configuration and writes valid JSON; the FLOP/byte floors are right.

Benchmarks are not timed tests: nothing here checks a latency, only that
every stage was measured and the records are well formed.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmdcl.bench.floors import inference_parameters, model_floors, model_flops
from cmdcl.bench.runner import Bench, BenchSettings
from cmdcl.cli.bench import main
from cmdcl.data.video import read_clip, write_video
from cmdcl.export.onnx_export import FullGraph, HeadGraph
from cmdcl.model import CMDCL, save_checkpoint, tiny_config
from conftest import small_config

RECORD_KEYS = {"backend", "stage", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput", "peak_mem_mb"}


# ---- floors ----------------------------------------------------------------------------------
def test_flops_hand_count():
    """small_config (32 px, patch 8, ViT width 32, 1 layer, D_vlm 24; F=4, S=5, D=32, depth 1, Kz=6) with C=3, by hand."""
    cfg = small_config()
    patch_embedding = 2 * 16 * (3 * 8 * 8) * 32  # 16 patches, 192 inputs, 32 outputs = 196_608
    vit_block = 2 * 17 * 32 * (3 * 32 + 32 + 2 * 128) + 4 * 17 * 17 * 32  # 17 tokens: 417_792 + 36_992
    per_frame = patch_embedding + vit_block + 2 * 17 * 32 * 24 + 2 * 5 * 24 * 32  # + ln_post@proj 26_112, token proj 7_680
    assert per_frame == 685_184
    sta_block = 2 * 20 * 32 * (3 * 32 + 32 + 2 * 128) + 4 * 20 * 20 * 32  # L = 4 frames x 5 tokens: 491_520 + 51_200
    op = 4 * 20 * 32 * (3 + 6)  # QK^T and PV over C + Kz = 9 memory rows: 23_040
    intervention = 2 * 20 * 32 * 32 * 2 + 2 * 20 * 64 * 32 + op  # query + gate, output projection
    head = sta_block + intervention + 2 * 32 * 32 + 2 * 32 * 3  # + video projection, classifier
    assert head == 731_840
    assert model_flops(cfg, 3) == {"frame_encoder": 4 * 685_184, "head": 731_840, "intervention_op": 23_040,
                                   "clip": 4 * 685_184 + 731_840}


@pytest.mark.parametrize("overrides", [{}, {"token_grid": 0, "visual_intervention": False, "mlp_ratio": 2.0, "pooling": "attention"}])
def test_flops_match_torch_flop_counter(overrides):
    """The analytic count equals PyTorch's FLOP counter on the model itself (attention through the math kernel, which
    the counter sees as matmuls)."""
    cfg = small_config(**overrides)
    torch.manual_seed(0)
    model = CMDCL(cfg, ["a", "b", "c"]).eval()
    head = HeadGraph(model)  # folds T' and the memories, as export does, outside the count
    frames = torch.randint(0, 256, (cfg.num_frames, 32, 32, 3), dtype=torch.uint8)
    counted = {}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            tokens = model.frame_tokens(frames)
        counted["frame_encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            head(tokens.unsqueeze(0))
        counted["head"] = counter.get_total_flops()
    flops = model_flops(cfg, 3)
    assert counted == {"frame_encoder": flops["frame_encoder"], "head": flops["head"]}


def test_inference_parameters_match_exported_constants():
    """Parameters the full graph keeps (not the textual branch or the memory projections, which are folded) plus
    the folded buffers."""
    cfg = small_config()
    graph = FullGraph(CMDCL(cfg, ["a", "b", "c"]).eval())
    folded_away = ("model.text", "model.textual.", "model.visual.k_", "model.visual.v_")
    kept = sum(p.numel() for name, p in graph.named_parameters() if not name.startswith(folded_away))
    constants = sum(b.numel() for name, b in graph.named_buffers() if not name.startswith("model."))
    assert inference_parameters(cfg, 3) == kept + constants


def test_floors_of_a_tiny_model_and_flops_of_the_base_model():
    floor = model_floors(tiny_config(num_frames=8), 10, batch=4)
    assert floor["weight_bytes"] == 4 * inference_parameters(tiny_config(num_frames=8), 10)
    assert floor["bytes_per_clip"] == pytest.approx(floor["weight_bytes"] / 4 + 8 * 96 * 96 * 3 + 4 * (10 + 128))
    from cmdcl.model import preset

    base = model_flops(preset("base"), 200)
    assert 34e9 < base["frame_encoder"] / 64 < 36e9  # ViT-B/16 at 224 px: ~17.6 GMAC = ~35 GFLOP per frame


# ---- what the measurements mean (report.py) ----------------------------------------------------
def _record(backend, stage, p50_ms, batch=1, **extra):
    from cmdcl.bench.runner import Record

    return Record(backend=backend, stage=stage, batch=batch, p50_ms=p50_ms, p90_ms=1.5 * p50_ms, p99_ms=2 * p50_ms, throughput=1.0,
                  unit="clips/s", video_s_per_s=None, peak_mem_mb=1.0, device_mem_mb=None, iters=1, **extra)


def test_comparisons_are_the_ratios_of_p50_in_a_fixed_order():
    from cmdcl.bench.report import comparisons

    records = [_record("pyav", "long_video_seek", 30.0), _record("pyav", "long_video_sequential", 90.0),
               _record("pyav", "decode_per_sample_exact", 8.0), _record("pyav", "decode_per_sample_keyframe", 2.0)]
    for backend, scale in (("torch", 1.0), ("ort", 0.5)):
        records += [_record(backend, "clip", 40.0 * scale), _record(backend, "stream_update_model", 10.0 * scale),
                    _record(backend, "end_to_end_serial", 100.0 * scale), _record(backend, "end_to_end_parallel", 25.0 * scale,
                                                                                  pipeline_efficiency=0.9)]
        records += [_record(backend, f"stream_grid_{decode}_gop{gop}s", ms * scale)
                    for gop in (2, 1) for decode, ms in (("all", 60.0 * gop), ("keyframes", 20.0))]
        records += [_record(backend, stage, ms * scale) for stage, ms in (("stream_scales_1", 50.0), ("stream_scales_3", 60.0),
                                                                          ("stream_scales_1_model", 8.0), ("stream_scales_2_model", 10.0))]
    got = [(c["comparison"], c.get("stage") or c.get("backend"), c["speedup"], c.get("efficiency")) for c in comparisons(records)]
    assert got == [
        *[("ort vs torch", stage, 2.0, None) for stage in ("clip", "stream_update_model", "end_to_end_serial", "end_to_end_parallel",
                                                           "stream_grid_all_gop2s", "stream_grid_keyframes_gop2s",
                                                           "stream_grid_all_gop1s", "stream_grid_keyframes_gop1s",
                                                           "stream_scales_1", "stream_scales_3", "stream_scales_1_model",
                                                           "stream_scales_2_model")],
        ("stream update (token cache) vs whole clip", "torch", 4.0, None), ("stream update (token cache) vs whole clip", "ort", 4.0, None),
        *[(f"1 vs {n} window scales (stream step, {where})", backend, ratio, None) for backend in ("torch", "ort")
          for n, where, ratio in ((3, "wall, incl. decoding", 1.2), (2, "time in the model", 1.25))],  # 60 / 50, 10 / 8
        ("N decoding workers vs 1 (end to end)", "torch", 4.0, 0.9), ("N decoding workers vs 1 (end to end)", "ort", 4.0, 0.9),
        ("seek vs sequential (long video)", "long_video", 3.0, None),
        *[(f"keyframe grid vs full decoding (streams per core, GOP {gop} s)", backend, 3.0 * gop, None)
          for gop in (1, 2) for backend in ("torch", "ort")],  # by GOP, then in the order the backends ran
        ("keyframe vs exact sampling (bench video)", "decode_per_sample", 4.0, None),
    ]


def test_pipeline_efficiency_and_floor_fractions():
    from cmdcl.bench.report import add_floor_fractions, pipeline_efficiency

    # decoding: median(100-40, 120-40, 110-40) = 70 ms, / 2 workers = 35 < the parallel model time 50; over the parallel wall 65
    assert pipeline_efficiency([100, 120, 110], [40, 40, 40], [60, 70, 65], [50, 45, 55], workers=2) == round(50 / 65, 3)
    # with 1 decoding worker's worth of parallelism the decoding (70 ms) bounds it
    assert pipeline_efficiency([100, 120, 110], [40, 40, 40], [60, 70, 65], [50, 45, 55], workers=1) == round(70 / 65, 3)
    floors = {2: {"flops": {"clip": 1e9, "head": 1e8, "frame_encoder": 9e8, "intervention_op": 1e6}, "bytes_per_clip": 1e6}}
    peaks = {"gemm_fp32_flops": 1e12, "gemm_fp16_flops": 4e12, "copy_bytes_per_s": 1e10}
    clip, head16, trt, op = (_record("torch", "clip", 10.0, batch=2), _record("torch-fp16", "head", 1.0, batch=2),
                             _record("trt", "frame_encoder", 1.0, batch=2), _record("torch", "intervention", 0.01, batch=2))
    decode, other_batch = _record("pyav", "decode_video", 5.0, batch=2), _record("torch", "clip", 10.0, batch=1)
    add_floor_fractions([clip, head16, trt, op, decode, other_batch], floors, peaks)
    assert (clip.gflops_per_s, clip.peak_flops_fraction, clip.floor_bytes_fraction) == (200.0, 0.2, 0.02)  # 2e9 FLOP in 10 ms
    assert (head16.gflops_per_s, head16.peak_flops_fraction, head16.floor_bytes_fraction) == (200.0, 0.05, None)  # of the fp16 peak
    assert (trt.gflops_per_s, trt.peak_flops_fraction) == (1800.0, 0.45)  # TensorRT engines are fp16
    assert (op.gflops_per_s, op.peak_flops_fraction) == (200.0, 0.2)  # the intervention op's own floor
    assert decode.gflops_per_s is decode.peak_flops_fraction is other_batch.gflops_per_s is None


# ---- the hook the long-video comparison uses ---------------------------------------------------
def test_read_clip_forced_strategy(tmp_path):
    rng = np.random.default_rng(0)
    path = write_video(tmp_path / "v.mp4", rng.integers(0, 255, (60, 48, 64, 3), dtype=np.uint8), rate=10, gop=10)
    seek, sequential = read_clip(path, 4, 32, strategy="seek"), read_clip(path, 4, 32, strategy="sequential")
    assert (seek.strategy, sequential.strategy) == ("seek", "sequential")
    assert seek.frames_decoded < sequential.frames_decoded
    np.testing.assert_array_equal(seek.frames, sequential.frames)
    with pytest.raises(ValueError, match="strategy"):
        read_clip(path, 4, 32, strategy="fastest")


def test_synthetic_video_has_sparse_keyframes(tmp_path, monkeypatch):
    """The generated 720p H.264 keeps the asked keyframe interval (FFmpeg's test source marks every frame I)."""
    import av

    from cmdcl.bench.videos import synthetic_video

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = synthetic_video(2.5, 1, log=lambda message: None)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height, stream.codec_context.name) == (1280, 720, "h264")
        keyframes = [float(p.pts * stream.time_base) for p in container.demux(stream) if p.is_keyframe and p.pts is not None]
    assert keyframes == pytest.approx([0.0, 1.0, 2.0])
    assert synthetic_video(2.5, 1, log=None) == path  # cached: not generated again (log=None would fail if it were)


# ---- the benchmark end to end -------------------------------------------------------------------
def test_every_stage_the_cli_offers_has_one_measuring_function():
    """--stages offers STAGES; each is run by exactly one of the two dispatch tables, and the CLI lists them all."""
    from cmdcl.bench.stages import BENCH_VIDEO_STAGES, MODEL_STAGES, STAGES, VIDEO_STAGES

    assert len(STAGES) == len(set(STAGES))
    assert not set(VIDEO_STAGES) & set(MODEL_STAGES)
    assert set(VIDEO_STAGES) | set(MODEL_STAGES) == set(STAGES)
    assert BENCH_VIDEO_STAGES <= set(STAGES)
    assert all(callable(measure) for measure in (*VIDEO_STAGES.values(), *MODEL_STAGES.values()))
    stages_option = next(p for p in main.params if p.name == "stages")
    assert stages_option.default.split(",") == list(STAGES) and all(stage in stages_option.help for stage in STAGES)


def test_cli_tiny_run_writes_json_and_plot(tmp_path, monkeypatch):
    """Every stage on both CPU backends and two batch sizes, with the generated 720p videos (tiny lengths)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out, plot, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    result = CliRunner().invoke(main, ["--preset", "tiny", "--frames", "4", "--classes", "5", "--iters", "2", "--warmup", "0",
                                       "--batch", "1,2", "--long-minutes", "0.05", "--threads", "2", "--json", str(out),
                                       "--plot", str(plot), "--markdown", str(md), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    records = report["records"]
    for r in records:
        assert RECORD_KEYS <= set(r), r
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["throughput"] > 0 and r["peak_mem_mb"] > 0 and r["iters"] >= 1
    measured = {(r["backend"], r["stage"], r["batch"]) for r in records}
    for stage in ("decode_video", "decode_stream", "preprocess", "long_video_seek", "long_video_sequential"):
        assert ("pyav", stage, 1) in measured
    for backend in ("torch", "ort"):
        for stage in ("frame_encoder", "head", "clip", "end_to_end", "stream_update", "stream_update_model",
                      *[f"stream_scales_{n}{part}" for n in (1, 2, 3) for part in ("", "_model")]):
            for batch in (1, 2):
                assert (backend, stage, batch) in measured
    assert ("torch", "intervention", 2) in measured
    assert [s["stage"] for s in report["skipped"]] == ["intervention"]  # ONNX Runtime: inside the graph only
    names = {c["comparison"] for c in report["comparisons"]}
    assert {"ort vs torch", "stream update (token cache) vs whole clip", "seek vs sequential (long video)",
            "1 vs 3 window scales (stream step, time in the model)"} <= names
    assert all(c["speedup"] > 0 for c in report["comparisons"])
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["threads"] == 2 and machine["cpu"] and "torch" in machine["versions"]
    assert report["settings"]["num_frames"] == 4 and report["config"]["num_frames"] == 4
    assert report["floors"]["1"]["flops"]["clip"] == model_flops(tiny_config(num_frames=4), 5)["clip"]
    clip = next(r for r in records if r["stage"] == "clip")
    assert 0 < clip["peak_flops_fraction"] and 0 < clip["floor_bytes_fraction"]
    assert "720" in next(r for r in records if r["stage"] == "decode_video")["note"]  # the generated 1280x720 video
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = md.read_text()
    assert table.count("\n| torch | clip |") == 2 and "| ort vs torch | clip | 1 |" in table
    assert "`cmdcl-bench --batch 1,2 --frames 4 --classes 5 --iters 2" in table
    assert "p50 ms" in result.output and "ort vs torch" in result.output


def test_gpu_backends_skip_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the GPU backends run instead of being skipped")
    settings = BenchSettings(preset="tiny", frames=2, classes=3, backends=("torch", "torch-fp16", "torch-fp16-triton", "trt"),
                             stages=("head",), iters=1, warmup=0)
    report = Bench(settings, log=lambda message: None).run()
    assert {r["backend"] for r in report["records"]} == {"torch"}
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"torch-fp16", "torch-fp16-triton", "trt"}
    assert all("GPU" in reason for reason in skipped.values())


def test_cli_engine_checkpoint_and_errors(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(CMDCL(small_config(), ["a", "b"]).eval(), tmp_path / "m.pt")
    runner = CliRunner()
    result = runner.invoke(main, ["--engine", str(checkpoint), "--stages", "head,intervention,clip", "--iters", "1",
                                  "--warmup", "0", "--json", str(tmp_path / "e.json"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert {(r["backend"], r["stage"]) for r in report["records"]} == {("torch", "head"), ("torch", "intervention"), ("torch", "clip")}
    assert all(r["engine"] == str(checkpoint) for r in report["records"])

    missing = runner.invoke(main, ["--engine", str(tmp_path / "nope.onnx"), "--stages", "head"])
    assert missing.exit_code == 1 and "nope.onnx: no such file" in missing.output and "Traceback" not in missing.output
    bad_batch = runner.invoke(main, ["--batch", "1,x"])
    assert bad_batch.exit_code == 2 and "expected batch sizes like 1,8,32, got '1,x'" in bad_batch.output
    bad_stage = runner.invoke(main, ["--stages", "head,warp"])
    assert bad_stage.exit_code == 2 and "'warp' is not one of 'decode_video'" in bad_stage.output
    frames_with_engine = runner.invoke(main, ["--engine", str(checkpoint), "--frames", "8"])
    assert frames_with_engine.exit_code == 2 and "--frames" in frames_with_engine.output
    no_dir = runner.invoke(main, ["--json", str(tmp_path / "no" / "x.json")])
    assert no_dir.exit_code == 1 and "does not exist" in no_dir.output


def test_an_interrupted_run_reports_and_writes_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C (or a time limit's SIGINT) in the second backend: the first backend's records are printed and written,
    marked partial, and the exit status is 130; an interrupt before anything was measured writes nothing."""
    from cmdcl.bench import stages

    def interrupt_on_ort(bench, target):
        if target.label == "ort":
            raise KeyboardInterrupt
        return real_head(bench, target)

    real_head = stages.MODEL_STAGES["head"]
    monkeypatch.setitem(stages.MODEL_STAGES, "head", interrupt_on_ort)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--preset", "tiny", "--frames", "2", "--classes", "3", "--iters", "1", "--warmup", "0", "--stages", "head",
            "--backend", "torch", "--backend", "ort", "--json", str(out), "--markdown", str(md), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert [(r["backend"], r["stage"]) for r in report["records"]] == [("torch", "head")]
    assert "interrupted: partial results" in result.output and "**interrupted: partial results" in md.read_text()

    monkeypatch.setitem(stages.MODEL_STAGES, "head", lambda bench, target: (_ for _ in ()).throw(KeyboardInterrupt))
    out.unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130 and not out.exists(), result.output
