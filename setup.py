"""Build for imbsam_fast.

``kernels/`` is installed as ``imbsam_fast.kernels`` (never as a top-level
``kernels`` package). The C++ extension in ``csrc/`` (``imbsam_fast._C``, the
``backend="ext"`` ops) is built with ninja when torch is importable at build
time and a C++ compiler is present; otherwise one line says why and the
install goes on without it (the torch and Triton backends need no compiler).
``IMBSAM_FAST_BUILD_EXT=0`` skips it. CUDA sources (``csrc/*.cu``) join the
build when torch has CUDA and nvcc is found.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# The applications (imbsam_fast.apps: command line, training loop, datasets, plots); the core needs torch only.
CLI_REQUIRES = ["numpy", "scikit-learn>=1.2", "tqdm", "matplotlib", "pillow"]


def _skip(why: str):
    print(f"imbsam_fast: building without the C++ extension ({why}); backend='ext' will be unavailable",
          file=sys.stderr)
    return [], {}


def _extensions():
    if os.environ.get("IMBSAM_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # noqa: BLE001 - any failure to import torch means: no extension
        return _skip(f"torch does not import at build time: {type(err).__name__}; install torch first and use "
                     "pip install --no-build-isolation")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _skip("no C++ compiler found")
    native = [] if os.environ.get("IMBSAM_FAST_NATIVE") == "0" else ["-march=native"]
    # -fopenmp: at::parallel_for is inline OpenMP; without it the extension's loops would run on one thread.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", *native]
    cuda = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu"))
    if cuda and torch.version.cuda and CUDA_HOME:
        ext = CUDAExtension("imbsam_fast._C", sources + cuda, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("imbsam_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
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
