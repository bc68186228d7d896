"""ONNX export of CMDCL: folded constants, the fused intervention node, metadata.

`export_onnx(model, out_path)` writes the full model and the streaming split
(frame_encoder, head); `cmdcl.export.metadata.read_metadata` is the loader the
runtime uses to validate such a file. Heavy optional libraries (onnxruntime,
tensorrt) are imported only by the functions that use them.
"""

from .onnx_export import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx"]
