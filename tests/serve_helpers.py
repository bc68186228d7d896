"""What the serving tests share: the serving venv, and a small exported model.

PyTriton and tritonclient pin numpy<2 and protobuf<7, so they live in
`.venv-serve` (`make serve-venv`, which `make test` runs first); these tests run
the server, the clients and Triton's config parser there, as subprocesses.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
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


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def request(url, body=None, timeout=60):
    """(HTTP status, parsed JSON body) of a GET, or a POST of `body` (a dict, or raw bytes)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@contextlib.contextmanager
def running_server(command, log_path: Path, ready_urls, env=None, timeout=120):
    """Start `command` in its own process group (so tritonserver and its workers are in
    it), wait until every URL in `ready_urls` answers 200, yield the process. At the
    end the group is stopped by the process's own pid: SIGTERM, SIGKILL after 30 s,
    and the test fails if any member outlives that."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(map(str, command)), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _all_ready(ready_urls):
                if process.poll() is not None:
                    pytest.fail(f"{command[0]} exited with {process.returncode}: {log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[0]} was not ready within {timeout} s")
                time.sleep(0.5)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):  # the test may have ended the server itself
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            if not _group_ended(process.pid, timeout=30):  # workers exit after the main process
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"processes of {command[0]}'s group outlived it by 30 s after SIGTERM")


def _all_ready(urls) -> bool:
    try:
        return all(request(url, timeout=2)[0] == 200 for url in urls)
    except OSError:
        return False


def _group_ended(pgid, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
