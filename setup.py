"""Build for imbsam_fast.

``kernels/`` is installed as ``imbsam_fast.kernels`` (never as a top-level
``kernels`` package). The C++/CUDA extension in ``csrc/`` is optional and built
only when ``IMBSAM_FAST_BUILD_EXT=1`` and its sources exist; the pure-torch
and Triton backends need no compiler.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# The applications (imbsam_fast.apps: command line, training loop, datasets, plots); the core needs torch only.
CLI_REQUIRES = ["numpy", "scikit-learn>=1.2", "tqdm", "matplotlib", "pillow"]


def _extensions():
    if os.environ.get("IMBSAM_FAST_BUILD_EXT") != "1":
        return [], {}
    sources = sorted(str(p) for p in (HERE / "csrc").glob("*.cpp"))
    if not sources:
        raise RuntimeError("IMBSAM_FAST_BUILD_EXT=1 but csrc/ has no C++ sources to build")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda = sorted(str(p) for p in (HERE / "csrc").glob("*.cu"))
    ext_cls = CUDAExtension if cuda else CppExtension
    ext = ext_cls("imbsam_fast._C", sources + cuda, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="imbsam_fast",
    version="0.1.0",
    description="Fast, faithful ImbSAM (class-imbalanced sharpness-aware minimization) for PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "imbsam_fast", "imbsam_fast.backends", "imbsam_fast.schedules", "imbsam_fast.kernels",
        "imbsam_fast.apps", "imbsam_fast.apps.data", "imbsam_fast.apps.bench",
    ],
    package_dir={"imbsam_fast.kernels": "kernels"},
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.2"],
        "cli": CLI_REQUIRES,
        "lightning": ["lightning>=2.0"],
        "vision": ["torchvision"],
        "test": ["triton>=3.2", "pytest>=7", "pytest-benchmark>=4", "ruff>=0.5", "lightning>=2.0", *CLI_REQUIRES],
    },
    entry_points={"console_scripts": ["imbsam-fast=imbsam_fast.apps.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
