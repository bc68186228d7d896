"""Serve a CMDCL runtime backend through PyTriton (the real Triton Inference Server,
bundled in the nvidia-pytriton wheel, runs without a GPU).

Three models, each with Triton's dynamic batching across requests:

    cmdcl          frames uint8 [B, F, H, W, 3] -> logits [B, C], embedding [B, D],
                   top_labels bytes [B, K], top_scores [B, K]   (whole clips)
    frame_encoder  frames uint8 [N, H, W, 3]    -> tokens [N, S, D]
    head           tokens fp32 [B, F, S, D]     -> logits [B, C], embedding [B, D]

Triton checks dtypes and shapes against these configs and answers a bad request
with an error; the model functions refuse an empty batch. Neither stops the
server. The inference itself is the runtime's `Backend.infer` (ONNX Runtime,
TensorRT or PyTorch), so served answers are the offline runtime's.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import numpy as np

from ..runtime.backends import Backend

DEFAULT_TOP_K = 5


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # clips per cmdcl/head call, frames per frame_encoder call
    queue_delay_us: int = 2000  # how long Triton waits to fill a batch
    top_k: int = DEFAULT_TOP_K


def python_library_env() -> None:
    """Point the loader at this interpreter's libpython first: Triton's Python-backend
    stub links libpython3.X by name and may otherwise pick the system's copy, whose C
    modules disagree with this interpreter's standard library."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


class _EmptyBatch(ValueError):
    pass


def model_functions(backend: Backend, top_k: int = DEFAULT_TOP_K) -> dict:
    """name -> function(**inputs as batched numpy arrays) -> outputs; what each served model computes."""
    classes = np.array([name.encode() for name in backend.info.classes], dtype=object)
    k = min(top_k, len(classes))

    def checked(name, array):
        if len(array) == 0:
            raise _EmptyBatch(f"empty batch: input {name!r} has no rows")
        return array

    def clips(frames):
        outputs = backend.infer("model", {"frames": checked("frames", frames)})
        probabilities = backend.probabilities(outputs["logits"])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return {**outputs, "top_labels": classes[order],
                "top_scores": np.take_along_axis(probabilities, order, axis=1).astype(np.float32)}

    return {
        "cmdcl": clips,
        "frame_encoder": lambda frames: backend.infer("frame_encoder", {"frames": checked("frames", frames)}),
        "head": lambda tokens: backend.infer("head", {"tokens": checked("tokens", tokens.astype(np.float32))}),
    }


def bind_models(triton, backend: Backend, config: ServeConfig) -> list[str]:
    """Bind the three models to a pytriton.triton.Triton; returns their names."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    info = backend.info
    f, size, s, d, c = info.num_frames, info.image_size, info.tokens_per_frame, info.width, len(info.classes)
    k = min(config.top_k, c)
    frames, clip = (size, size, 3), (f, size, size, 3)
    heads = [Tensor(name="logits", dtype=np.float32, shape=(c,)), Tensor(name="embedding", dtype=np.float32, shape=(d,))]
    signatures = {
        "cmdcl": ([Tensor(name="frames", dtype=np.uint8, shape=clip)],
                  heads + [Tensor(name="top_labels", dtype=bytes, shape=(k,)),
                           Tensor(name="top_scores", dtype=np.float32, shape=(k,))]),
        "frame_encoder": ([Tensor(name="frames", dtype=np.uint8, shape=frames)],
                          [Tensor(name="tokens", dtype=np.float32, shape=(s, d))]),
        "head": ([Tensor(name="tokens", dtype=np.float32, shape=(f, s, d))], heads),
    }
    model_config = ModelConfig(max_batch_size=config.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us))
    for name, function in model_functions(backend, config.top_k).items():
        inputs, outputs = signatures[name]
        triton.bind(model_name=name, infer_func=batch(function), inputs=inputs, outputs=outputs, config=model_config,
                    strict=True)
    return list(signatures)


def triton_config(config: ServeConfig):
    from pytriton.triton import TritonConfig

    return TritonConfig(http_address=config.host, http_port=config.http_port, grpc_address=config.host,
                        grpc_port=config.grpc_port, metrics_port=config.metrics_port, allow_metrics=False,
                        exit_timeout_secs=5)


def serve(backend: Backend, config: ServeConfig, on_ready=None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); `on_ready(model names)` runs once the models are loaded."""
    python_library_env()
    from pytriton.triton import Triton

    with Triton(config=triton_config(config)) as triton:
        names = bind_models(triton, backend, config)
        triton.run()
        if on_ready:
            on_ready(names)
        triton.serve()
