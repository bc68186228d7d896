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
