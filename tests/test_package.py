"""Packaging promises: cheap imports, working entry points."""

import json
import subprocess
import sys

HEAVY = ["tensorrt", "tensorrt_rtx", "triton", "onnxruntime", "tritonclient", "pytriton", "cupy"]


def test_importing_cmdcl_does_not_import_heavy_optional_libraries():
    code = (
        "import json, sys, cmdcl, cmdcl.model, cmdcl.kernels;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_demo_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "cmdcl.cli.demo", "--seed", "1"], check=True, capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("CMDCL tiny") and len(lines) == 4
    probs = [float(line.split()[-1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
