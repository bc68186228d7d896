#!/usr/bin/env bash
# Every GPU check and timing of the project in one call, for a lent GPU machine that has torch, triton and
# cupy but no TensorRT and no network (PyAV may come as a carried wheel). From a checkout:
#
#     benchmarks/gpu_all.sh OUTDIR [SECONDS [STEP...]]
#
# Steps (all, or the STEPs named), most important first, each cut off so that the whole run ends within SECONDS
# (default 420); cmdcl-bench cut off by its time limit still writes what it measured:
#   1. gpu_check: benchmarks/gpu_check.py --quick: kernel parity (Triton, AOT PTX, fused Q) and op timings
#   2. bench_eager: cmdcl-bench, base preset, eager PyTorch fp32/fp16/bf16 and the fused Triton intervention, batch 1 and 8
#   3. bench_compiled: cmdcl-bench, base preset, torch.compile (fp32) and fp16 with CUDA graphs, batch 1
#   4. bench_video: cmdcl-bench, base preset, PyTorch fp16: decoding, decode + classify end to end (one process and
#      8 decoding workers) and a stream window update
# TensorRT and ONNX Runtime GPU are not measured: neither is installed there. Logs, JSON and Markdown go to OUTDIR.
set -u
out=${1:?usage: benchmarks/gpu_all.sh OUTDIR [SECONDS]}
deadline=$((SECONDS + ${2:-420}))
steps=${*:3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

step() {  # step NAME MAX_SECONDS COMMAND...: run with a timeout of MAX_SECONDS or what is left, log to OUTDIR/NAME.log
    local name=$1 limit=$2 left=$((deadline - SECONDS)) started=$SECONDS
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 10)); then echo "== $name: skipped, no time left" | tee "$out/$name.log"; return; fi
    echo "== $name (at most ${limit} s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.csv"
"$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

bench=("$python" -m cmdcl.cli.bench --device cuda --preset base --iters 20 --warmup 3)
want() { [[ -z "$steps" || " $steps " == *" $1 "* ]]; }
want gpu_check && step gpu_check 200 "$python" benchmarks/gpu_check.py --quick --out "$out/gpu_check.json"
want bench_eager && step bench_eager 150 "${bench[@]}" --batch 1,8 --backend torch --backend torch-fp16 --backend torch-bf16 \
    --backend torch-fp16-triton --stages frame_encoder,head,intervention,clip --json "$out/bench_eager.json" --markdown "$out/bench_eager.md"
want bench_compiled && step bench_compiled 150 "${bench[@]}" --batch 1 --backend torch-compile --backend torch-fp16-cudagraphs \
    --stages frame_encoder,head,intervention,clip --json "$out/bench_compiled.json" --markdown "$out/bench_compiled.md"
# 5 stream updates need a 6-minute video (the base model's grid is 1 frame/s); keyframe sampling, as users would decode
want bench_video && step bench_video 200 "${bench[@]}" --batch 1 --iters 5 --backend torch-fp16 --sampling keyframe --workers 8 \
    --stages decode_video,end_to_end,end_to_end_workers,stream_update --json "$out/bench_video.json" --markdown "$out/bench_video.md"
