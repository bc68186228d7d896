"""benchmarks/gpu_check.py: its GPU-free parts (AOT launch arguments, floors,
table and JSON) on any machine; the full check on a CUDA GPU with cupy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_floors(gpu_check):
    shape = gpu_check.Shape("s", batch=2, seq_len=3, width=8, heads=2, num_text=5, num_conf=7)
    floor = gpu_check.floors(shape, element_bytes=2)
    tokens = 6
    assert floor["bytes"] == 2 * (tokens * 8 + tokens * 16 + 2 * 12 * 8 + 7)  # Q in, [M; Zh] out, K/V of both memories, prior
    assert floor["flops"] == 2 * 2 * tokens * 12 * 8  # QK^T and PV over C + Kz rows, 2 FLOPs per MAC


def test_aot_arguments_follow_the_plugin_order(gpu_check):
    from cmdcl.kernels.tensorrt_plugin import aot_launch

    kernel = aot_launch("fp32", 2, 16, 5, 7, 0.25, arch=80, tactic=2)
    inputs = [torch.zeros(1) for _ in range(6)]
    out = torch.zeros(1)
    args = gpu_check.aot_arguments(kernel, inputs, out, seq_len=11, num_text=5, num_conf=7)
    assert [int(a) for a in args] == [t.data_ptr() for t in inputs] + [11, 5, 7, out.data_ptr()]
    assert [type(a) for a in args] == [np.uint64] * 6 + [np.int32] * 3 + [np.uint64]


# The device machines have torch, triton, cupy and numpy: the script must not
# need the toolkit's other dependencies.
NOT_ON_GPU_MACHINES = ("av", "click", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "matplotlib", "psutil")
RUN_WITHOUT_THEM = (
    "import runpy, sys\n"
    "sys.modules.update(dict.fromkeys({blocked!r}))  # import -> ImportError\n"
    "sys.argv = [{script!r}, *sys.argv[1:]]\n"
    "runpy.run_path({script!r}, run_name='__main__')\n"
)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its subprocess may take 300 s
def test_dry_run_writes_table_and_json(tmp_path):
    out = tmp_path / "check.json"
    wrapper = RUN_WITHOUT_THEM.format(blocked=NOT_ON_GPU_MACHINES, script=str(SCRIPT))
    proc = subprocess.run([sys.executable, "-c", wrapper, "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MB moved (floor)" in proc.stdout and "serving B=32" in proc.stdout
    report = json.loads(out.read_text())
    assert report["parity"] is None and report["timings"] is None  # nothing measured without a GPU
    launch = report["dry_run"]
    assert launch["grid"] == [5, 256, 1] and launch["block"] == [128, 1, 1]  # L=320 / 64 rows, B=32 x h=8
    assert launch["arguments"][6:9] == ["seq_len=int32", "num_text=int32", "num_conf=int32"]
    serving_fp16 = next(r for r in report["floors"] if r["shape"] == "serving B=32" and r["dtype"] == "fp16")
    assert serving_fp16["flops"] == 4 * 32 * 320 * 512 * (200 + 1024)


@pytest.mark.slow
@pytest.mark.timeout(900)  # its subprocess may take 600 s
def test_full_check_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy", reason="the AOT check launches the PTX through cupy")
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["parity"] and all(row["ok"] for row in report["parity"])
    assert all(row["ms"] > 0 for row in report["timings"])
