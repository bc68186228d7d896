"""What the serving tests share: the serving venv, and a small exported model.

PyTriton and tritonclient pin numpy<2 and protobuf<7, so they live in
`.venv-serve` (`make serve-venv`, which `make test` runs first); these tests run
the server, the clients and Triton's config parser there, as subprocesses.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV = Path(os.environ.get("CMDCL_SERVE_VENV", ROOT / ".venv-serve"))
SERVE_BIN = SERVE_VENV / "bin"
CLASSES = ["make tea", "fry egg", "make pancake"]


def require_serve_venv():
    if not (SERVE_BIN / "python").exists():
        pytest.skip(f"no serving venv at {SERVE_VENV} (PyTriton needs numpy<2): run `make serve-venv` "
                    "(make test does) or set CMDCL_SERVE_VENV")


def export_small_model(directory: Path) -> dict:
    """The 32 px, 4-frame test model exported with its split graphs; returns export_onnx's paths."""
    from cmdcl.export import export_onnx
    from cmdcl.model import CMDCL, save_checkpoint

    torch.manual_seed(0)
    model = CMDCL(small_config(), CLASSES).eval()
    save_checkpoint(model, directory / "model.pt")
    return export_onnx(model, directory / "model.onnx")


def run_serve_python(*args, timeout=120) -> subprocess.CompletedProcess:
    """`python *args` in the serving venv."""
    return subprocess.run([str(SERVE_BIN / "python"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
