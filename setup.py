"""Builds rlp_engine._C from csrc/: the C++ (OpenMP) ops always, the CUDA ops only when the
installed torch has CUDA and RLP_SKIP_CUDA is not set. Install torch first, then
`pip install --no-build-isolation -e .` (an isolated build would fetch a CUDA torch)."""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

skip_cuda = os.environ.get("RLP_SKIP_CUDA", "0") == "1"
with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not skip_cuda

sources = sorted(glob.glob("csrc/*.cpp"))
# The extension is always built from source on the machine that uses it, so -march=native lets the
# compiler vectorise the per-token loops with whatever SIMD the CPU has; RLP_PORTABLE=1 turns it off.
# -fno-trapping-math lets GCC vectorise the select-heavy loss loops (value loss 19 ms -> 2.2 ms).
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
if os.environ.get("RLP_PORTABLE", "0") != "1" and sys.platform == "linux":
    cxx_flags.append("-march=native")
extra = {"cxx": cxx_flags}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    extra["cxx"] = cxx_flags + ["-DRLP_WITH_CUDA"]
    extra["nvcc"] = ["-O3", "-std=c++20", "-DRLP_WITH_CUDA", "--use_fast_math"]
    ext = CUDAExtension("rlp_engine._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("rlp_engine._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])

# rlp_engine/kernels is a committed symlink to the top-level kernels/, which has no __init__.py: a
# namespace directory loses to any installed regular `kernels` package, so `import kernels` run from the
# repo root (cwd first on sys.path) finds Hugging Face's `kernels`, which transformers >= 5.25 imports,
# never ours. find_packages skips a directory without __init__.py, hence the explicit name; the wheel
# gets the files as rlp_engine/kernels/*.py and an editable install finds them through the symlink.
packages = find_packages(include=["rlp_engine", "rlp_engine.*"]) + ["rlp_engine.kernels"]

setup(
    packages=packages,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
