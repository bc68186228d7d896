"""The repository's Python-backend models (`cmdcl` BLS over whole clips, the
sequence-batched `cmdcl_stream`) running on a real Triton server: the one the
nvidia-pytriton wheel bundles, started directly on the written repository.

That server build has only the Python backend, so `frame_encoder` and `head`
(ONNX Runtime backend in the repository) are stood in for by Python-backend
models that run the same exported ONNX files with onnxruntime (`STAND_IN`).
Everything else (configs, labels, the BLS file, batching, sequence control)
is the repository exactly as written. Requests use Triton's HTTP/JSON protocol.
"""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from cmdcl.artifacts import relative_error, window_positions
from cmdcl.data.video import write_video
from cmdcl.runtime import Recognizer, load_backend
from cmdcl.serve.triton_repo import BLS_SOURCE, write_triton_repo
from serve_helpers import (
    CLASSES,
    SERVE_BIN,
    SERVE_VENV,
    export_small_model,
    free_ports,
    request,
    require_serve_venv,
    running_server,
)
from test_triton_repo import export_recorded_model

STAND_IN = '''"""Test stand-in for Triton's ONNX Runtime backend: runs 1/model.onnx with onnxruntime."""
import json
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input, self.outputs = config["input"][0]["name"], [o["name"] for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        outputs = self.session.run(self.outputs, {self.input: np.concatenate(arrays)})
        responses, start = [], 0
        for array in arrays:
            stop = start + len(array)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, o[start:stop]) for n, o in zip(self.outputs, outputs)]))
            start = stop
        return responses
'''
NUM_FRAMES, STRIDE, MAX_FRAMES = 4, 2, 8


def bundled_tritonserver():
    """(tritonserver binary, python backend dir, stub, its libs) from the serving venv's nvidia-pytriton."""
    require_serve_venv()
    found = sorted(SERVE_VENV.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    if not found:
        pytest.skip(f"nvidia-pytriton is not installed in {SERVE_VENV}")
    server = found[0]
    version = server.parents[2].name.removeprefix("python")  # lib/python3.11/site-packages/pytriton/tritonserver
    return server / "bin" / "tritonserver", server / "backends" / "python", \
        server / "python_backend_stubs" / version / "triton_python_backend_stub", server.parents[1] / "nvidia_pytriton.libs"


@contextlib.contextmanager
def triton_server(root, paths, **repo_options):
    """The bundled Triton server on the repository written for `paths` with `repo_options`: {"base", "process"}."""
    binary, python_backend, stub, libs = bundled_tritonserver()
    repo = root / "repo"
    write_triton_repo(paths["full"], repo, max_batch=4, max_frames=MAX_FRAMES, **repo_options)
    for role in ("frame_encoder", "head"):
        config = repo / role / "config.pbtxt"
        config.write_text(config.read_text().replace('backend: "onnxruntime"\nplatform: "onnxruntime_onnx"', 'backend: "python"'))
        (repo / role / "1" / "model.py").write_text(STAND_IN)
    backends = root / "backends" / "python"
    backends.mkdir(parents=True)
    for source in (python_backend / "libtriton_python.so", python_backend / "triton_python_backend_utils.py", stub):
        shutil.copy(source, backends / source.name)
    http, grpc, metrics = free_ports(3)
    libdir = subprocess.run([str(SERVE_BIN / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, PATH=f"{SERVE_BIN}:{os.environ['PATH']}",  # the stub takes the venv's python (numpy<2)
               LD_LIBRARY_PATH=f"{libdir}:{libs}")  # and its libpython, not the system's
    command = [binary, f"--model-repository={repo}", f"--backend-directory={root / 'backends'}", "--http-address=127.0.0.1",
               "--grpc-address=127.0.0.1", f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
               "--allow-metrics=false", "--exit-timeout-secs=5"]
    base = f"http://127.0.0.1:{http}"
    with running_server(command, root / "tritonserver.log", [f"{base}/v2/health/ready"], env=env) as process:
        yield {"base": base, "process": process}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """A model without a recorded sampling (F = 4 frames in 4 s) served with stride 2, its default."""
    root = tmp_path_factory.mktemp("bls")
    paths = export_small_model(root)
    with triton_server(root, paths, stride_frames=STRIDE) as server:
        yield {**server, "offline": load_backend(paths["full"])}


@pytest.fixture(scope="module")
def triton_scales(tmp_path_factory):
    """The model with RECORDED (F = 4 frames in 8 s, stride 3) served with two scales, 8 s and 18 s (N = 4 and 9
    grid frames), the stride left to the recorded one."""
    root = tmp_path_factory.mktemp("bls_scales")
    paths = export_recorded_model(root)
    with triton_server(root, paths, windows=(8, 18)) as server:
        yield {**server, "offline": load_backend(paths["full"])}


def infer(base, model, name, array, parameters=None):
    body = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": "UINT8", "data": array.reshape(-1).tolist()}]}
    if parameters:
        body["parameters"] = parameters
    status, answer = request(f"{base}/v2/models/{model}/infer", body)
    if status != 200:
        return status, answer
    return status, {o["name"]: np.array(o["data"], dtype=float).reshape(o["shape"]) for o in answer["outputs"]}


def test_bls_clip_model_equals_offline_runtime(triton):
    frames = np.random.default_rng(2).integers(0, 256, (3, NUM_FRAMES, 32, 32, 3), dtype=np.uint8)  # 12 frames > MAX_FRAMES
    status, served = infer(triton["base"], "cmdcl", "frames", frames)
    assert status == 200, served
    expected = triton["offline"].infer("full", {"frames": frames})
    for name in ("logits", "embedding"):
        assert relative_error(served[name], expected[name]) <= 1e-4, name


def test_labels_file_gives_class_names_through_the_classification_extension(triton):
    frames = np.random.default_rng(5).integers(0, 256, (1, NUM_FRAMES, 32, 32, 3), dtype=np.uint8)
    body = {"inputs": [{"name": "frames", "shape": list(frames.shape), "datatype": "UINT8", "data": frames.reshape(-1).tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}
    status, answer = request(f"{triton['base']}/v2/models/cmdcl/infer", body)
    assert status == 200, answer
    logits = triton["offline"].classify_clips(frames)[0]
    best = np.argsort(-logits)[:2]
    # "score:index:label", best first
    assert [entry.split(":")[1:] for entry in answer["outputs"][0]["data"]] == [[str(i), CLASSES[i]] for i in best]


def test_stream_model_windows_per_camera_equal_offline_windows(triton):
    """Two cameras interleaved: a ring buffer of F frames per sequence id, the first
    window at F frames then every STRIDE frames; a camera that ends before F frames
    gets one window of its frames repeated (as cmdcl-run --mode stream does)."""
    offline, rng = triton["offline"], np.random.default_rng(3)
    cameras = {11: rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), 12: rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    expected_windows = {11: {3: 0, 5: 1}, 12: {2: 0}}  # frame index -> window index
    for i in range(7):
        for camera, frames in cameras.items():
            if i >= len(frames):
                continue
            parameters = {"sequence_id": camera, "sequence_start": i == 0, "sequence_end": i == len(frames) - 1}
            status, served = infer(triton["base"], "cmdcl_stream", "frame", frames[i : i + 1], parameters)
            assert status == 200, served
            window = int(served["window"][0, 0])
            assert window == expected_windows[camera].get(i, -1), (camera, i)
            if window < 0:
                assert np.isnan(served["logits"]).all()
                continue
            recent = frames[max(0, i + 1 - NUM_FRAMES) : i + 1]
            if len(recent) < NUM_FRAMES:
                recent = recent[[int((k + 0.5) * len(recent) / NUM_FRAMES) for k in range(NUM_FRAMES)]]
            reference = offline.classify_tokens(offline.encode_frames(recent)[None])
            assert relative_error(served["logits"], reference) <= 1e-4, (camera, i)


def test_stream_model_keeps_cameras_apart_under_concurrent_requests(triton):
    """Three cameras sending at once (the sequence batcher may put their frames in one
    execution): every window still equals the offline result for that camera's frames."""
    offline, rng = triton["offline"], np.random.default_rng(4)
    cameras = {21 + c: rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for c in range(3)}
    results = {}

    def send(camera, frames):
        for i in range(len(frames)):
            parameters = {"sequence_id": camera, "sequence_start": i == 0, "sequence_end": i == len(frames) - 1}
            results[camera, i] = infer(triton["base"], "cmdcl_stream", "frame", frames[i : i + 1], parameters)

    threads = [threading.Thread(target=send, args=item) for item in cameras.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for camera, frames in cameras.items():
        windows = []
        for i in range(len(frames)):
            status, served = results[camera, i]
            assert status == 200, served
            if served["window"][0, 0] >= 0:
                windows.append(i)
                reference = offline.classify_tokens(offline.encode_frames(frames[i + 1 - NUM_FRAMES : i + 1])[None])
                assert relative_error(served["logits"], reference) <= 1e-4, (camera, i)
        assert windows == [3, 5], camera  # F = 4 frames, then every STRIDE = 2


def test_bls_models_refuse_bad_requests_and_keep_serving(triton):
    base = triton["base"]
    status, answer = infer(base, "cmdcl_stream", "frame", np.zeros((2, 32, 32, 3), np.uint8),
                           {"sequence_id": 40, "sequence_start": True})
    assert status == 400 and "must specify batch-size 1" in answer["error"]  # Triton's sequence batcher
    status, answer = infer(base, "cmdcl_stream", "frame", np.zeros((1, 32, 32, 3), np.uint8))  # no sequence id
    assert status == 400 and "correlation id" in answer["error"].lower()
    status, answer = infer(base, "cmdcl", "frames", np.zeros((1, NUM_FRAMES + 1, 32, 32, 3), np.uint8))
    assert status == 400 and "unexpected shape" in answer["error"]
    assert triton["process"].poll() is None
    status, served = infer(base, "cmdcl", "frames", np.zeros((1, NUM_FRAMES, 32, 32, 3), np.uint8))
    assert status == 200 and served["logits"].shape == (1, 3)


def test_bls_window_positions_mirror_the_runtime(monkeypatch):
    """triton_bls.py cannot import cmdcl inside Triton, so it copies the position rule: both give the same
    positions, for windows of every length and parts shorter than a window."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("cmdcl_triton_bls_under_test", BLS_SOURCE)
    bls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bls)
    pairs = [(f, n) for f in range(1, 33) for n in range(1, 200)] + [(64, 4096), (7, 4093), (8, 4096), (16, 1000)]
    for f, n in pairs:
        assert bls.window_positions(f, n) == window_positions(f, n), (f, n)
    assert bls.window_positions(4, 9) == [1, 3, 5, 7]  # floor((j + 0.5) * 9 / 4), by hand


def grid_video(path, seconds, seed, rate=4):
    """A 32 px video of `seconds` at `rate` frames per second, blocky random content (so that frames differ)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (round(seconds * rate), 4, 4, 3), dtype=np.uint8)
    return write_video(path, blocks.repeat(8, axis=1).repeat(8, axis=2), rate=rate)


def runtime_windows(backend, video, windows):
    """cmdcl-run --mode stream on `video` (ONNX Runtime): the grid frames it encoded, in order, and each window's
    logits by (scale, window index)."""
    frames, logits = [], []
    encode, classify = backend.encode_frames, backend.classify_tokens
    backend.encode_frames = lambda x: (frames.append(x.copy()), encode(x))[1]
    backend.classify_tokens = lambda x: (logits.append(classify(x)), logits[-1])[1]
    try:
        records = [r for r in Recognizer(backend, window=windows, top_k=len(CLASSES)).stream(video) if not r.get("summary")]
    finally:
        del backend.encode_frames, backend.classify_tokens  # the class's methods again
    rows = np.concatenate(logits)
    assert len(rows) == len(records)
    found = {}
    for record, row in zip(records, rows):  # head rows come in record order: the scores say so
        probabilities = backend.probabilities(row)
        assert all(abs(top["score"] - probabilities[CLASSES.index(top["label"])]) <= 1e-6 for top in record["top"])
        found[round(record["scale"], 3), record["window"]] = row
    return np.concatenate(frames), found


def served_windows(base, cameras):
    """Send each camera's grid frames to cmdcl_stream, one request per frame, cameras interleaved: for each camera,
    {(scale, window index): (frame index, logits)} of the windows the responses carry."""
    found = {camera: {} for camera in cameras}
    for i in range(max(map(len, cameras.values()))):
        for camera, frames in cameras.items():
            if i >= len(frames):
                continue
            parameters = {"sequence_id": camera, "sequence_start": i == 0, "sequence_end": i == len(frames) - 1}
            status, served = infer(base, "cmdcl_stream", "frame", frames[i : i + 1], parameters)
            assert status == 200, served
            window, scale = served["window"][0], served["scale"][0]
            assert served["logits"].shape == ((1, len(CLASSES)) if len(window) == 1 else (1, len(window), len(CLASSES)))
            logits = served["logits"].reshape(len(window), -1)
            assert np.isnan(logits[window < 0]).all() and not np.isnan(logits[window >= 0]).any()
            for k in np.flatnonzero(window >= 0):
                found[camera][round(float(scale[k]), 3), int(window[k])] = i, logits[k]
    return found


@pytest.mark.parametrize("setup", ["one scale", "two scales"])
def test_stream_model_windows_equal_the_runtime_stream_windows(triton, triton_scales, tmp_path, setup):
    """The same grid frames (those cmdcl-run --mode stream encoded for a video) sent to cmdcl_stream give the
    runtime's windows: the same (scale, window index) pairs, due at the frames worked out by hand, with logits
    within 1e-4 (relative L2). One scale: the model's 4 s window (1 grid frame/s), stride 2 frames; two scales:
    the recorded 8 s window (0.5 grid frame/s) and 18 s (N = 9 frames), the recorded stride of 3 frames. A camera
    shorter than a window gets one window of the shortest scale with its frames repeated."""
    if setup == "one scale":  # 11 s = 11 grid frames, 2.5 s = 3; windows (scale, index) -> frame index, by hand:
        server, windows, seconds, expected = triton, None, (11, 2.5), {(4.0, 0): 3, (4.0, 1): 5, (4.0, 2): 7, (4.0, 3): 9}
    else:  # 30 s = 15 grid frames, 5 s = 3; steps at frames 4, 7, 10, 13 (1-based), the 18 s scale once 9 have come
        server, windows, seconds = triton_scales, (8, 18), (30, 5)
        expected = {(8.0, 0): 3, (8.0, 1): 6, (8.0, 2): 9, (8.0, 3): 12, (18.0, 0): 9, (18.0, 1): 12}
    offline = server["offline"]
    long_frames, long_windows = runtime_windows(offline, grid_video(tmp_path / "long.mp4", seconds[0], seed=6), windows)
    short_frames, short_windows = runtime_windows(offline, grid_video(tmp_path / "short.mp4", seconds[1], seed=7), windows)
    assert (len(long_frames), len(short_frames)) == (15 if windows else 11, 3)
    shortest = min(scale for scale, _ in expected)
    served = served_windows(server["base"], {31: long_frames, 32: short_frames})
    for camera, reference, due in ((31, long_windows, expected), (32, short_windows, {(shortest, 0): 2})):
        assert {key: i for key, (i, _) in served[camera].items()} == due, camera
        assert set(reference) == set(due), camera
        for key, (_, logits) in served[camera].items():
            assert relative_error(logits, reference[key]) <= 1e-4, (camera, key)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
