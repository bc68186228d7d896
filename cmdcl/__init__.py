"""CMDCL deployment toolkit: the PyTorch model, export, kernels and runtime.

Importing this package is cheap: torch is imported by the submodules that need
it, and heavy optional libraries (tensorrt, triton, onnxruntime, serving) only
where they are used.
"""

__version__ = "0.1.0"
