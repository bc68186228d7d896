"""Packaging promises: cheap imports, working entry points."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["tensorrt", "tensorrt_rtx", "triton", "onnxruntime", "tritonclient", "pytriton", "cupy"]


def test_importing_cmdcl_does_not_import_heavy_optional_libraries():
    code = (
        "import json, sys, cmdcl, cmdcl.model, cmdcl.kernels;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_importing_the_kernels_does_not_import_the_export_layer():
    """The kernels own their ONNX node: even the impl="onnx" path stays below cmdcl.export (no import cycle)."""
    code = (
        "import json, sys, torch;"
        "from cmdcl.kernels import causal_intervention;"
        "import cmdcl.kernels.onnx_node, cmdcl.kernels.tensorrt_plugin;"
        "q, memory = torch.zeros(1, 2, 8), torch.zeros(2, 3, 4);"
        "causal_intervention(q, memory, memory, memory, memory, torch.zeros(3), num_heads=2, impl='onnx');"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cmdcl.export'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_setup_reads_the_version_whatever_follows_it(tmp_path):
    """setup.py finds `__version__` even when cmdcl/__init__.py gains a paragraph after it."""
    import cmdcl

    (tmp_path / "cmdcl").mkdir()
    init = (ROOT / "cmdcl" / "__init__.py").read_text()
    (tmp_path / "cmdcl" / "__init__.py").write_text(f'{init}\n\ndef later():\n    """A paragraph after __version__."""\n')
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == cmdcl.__version__
