"""Build and install dist_rec with its native extension ``dist_rec._C``.

The extension holds the fused embedding kernels (``csrc/``). It is built with
``torch.utils.cpp_extension`` against the torch already installed, so install
with ``pip install --no-build-isolation -e .`` after torch.

Environment:
    USE_CUDA=0   build the CPU kernels only, even where torch has CUDA.
    TORCH_CUDA_ARCH_LIST  GPU targets (default "8.0;9.0": A100 and Hopper).
    DEBUG=1      build without optimisation, with debug symbols.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _sources(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "**", pattern), recursive=True))


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    use_cuda = (
        os.environ.get("USE_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is a header template: its OpenMP pragmas are compiled
    # into our objects, so we need -fopenmp (the runtime is torch's libgomp).
    # The kernels pick AVX-512 / AVX2 / scalar at run time (see
    # csrc/embedding_bag/kernels/dispatch.cpp); the baseline stays x86-64.
    # (No -fvisibility=hidden: with torch 2.11 it left c10's ValueError and
    # IndexError type info private to this library, and raising them crashed.)
    cxx_flags += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = _sources("*.cpp")
    extra = {"cxx": cxx_flags}
    if use_cuda:
        sources += _sources("*.cu")
        # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_type = CUDAExtension
    else:
        ext_type = CppExtension
    return ext_type(
        name="dist_rec._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC, "include"), os.path.join(ROOT, CSRC)],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=[("DIST_REC_WITH_CUDA", "1")] if use_cuda else [],
    )


setup(
    name="dist_rec",
    version="0.1.0",
    description="Fused, sharded embedding training for recommendation models (DLRM) on CPUs and GPUs",
    packages=find_packages(include=["dist_rec", "dist_rec.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "pyyaml", "matplotlib", "scipy"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
