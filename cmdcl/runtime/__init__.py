"""The streaming runtime: backends (PyTorch, ONNX Runtime, TensorRT), video and stream mode, output writers.

    from cmdcl.runtime import Recognizer
    Recognizer("model.onnx").predict("video.mp4")      # one summary record
    for record in Recognizer("model.onnx").stream("rtsp://..."): ...
"""

from .backends import BACKENDS, Backend, BackendError, ModelInfo, load_backend
from .recognizer import Recognizer

__all__ = ["BACKENDS", "Backend", "BackendError", "ModelInfo", "Recognizer", "load_backend"]
