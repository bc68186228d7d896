"""Serving CMDCL with NVIDIA Triton Inference Server.

- `triton_repo`: writes a Triton model repository (frame_encoder and head on
  the ONNX Runtime or TensorRT backend, a BLS model `cmdcl` for whole clips,
  a sequence-batching model `cmdcl_stream` for per-frame camera streams) and
  validates its configs with Triton's own protobuf schema.
- `server`: `cmdcl-serve`, the runtime's backends served through PyTriton.
- `client`: a tritonclient example (HTTP and gRPC) and a bounded load test.

PyTriton and tritonclient live in the `serve` extra (PyTriton pins numpy<2,
so `make serve-venv` keeps them in `.venv-serve`); they are imported only by
the functions that use them.
"""
