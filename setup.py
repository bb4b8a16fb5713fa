"""Build and install dist_rec with its native extension ``dist_rec._C``.

The extension holds the fused embedding kernels (``csrc/``). It is built with
``torch.utils.cpp_extension`` against the torch already installed, so install
with ``pip install --no-build-isolation -e .`` after torch.

Requirements come from the requirements files (one list each, shared with
the Makefile): ``install_requires`` is requirements.txt, with torch pinned to
the release the extension is built against; the extras are

    parquet    pyarrow, for Parquet data files
    interop    FBGEMM and TorchRec, the peers tests and benchmarks compare with
               (install them with --no-deps: see ``_EXTRAS``)
    deepspeed  DeepSpeed, the optional dense engine (docs/deepspeed.md)
    dev        building, testing and benchmarking (requirements-dev.txt)

Environment:
    USE_CUDA=0   build the CPU kernels only, even where torch has CUDA.
    TORCH_CUDA_ARCH_LIST  GPU targets (default "8.0;9.0": A100 and Hopper).
    DEBUG=1      build without optimisation, with debug symbols.
"""

import glob
import os
import re

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


def _requirements(name: str) -> list[str]:
    """The requirements in the requirements file ``name``, without comments."""
    with open(os.path.join(ROOT, name)) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _install_requires() -> list[str]:
    """requirements.txt, with torch pinned to the release this build is
    compiled against (``2.13.0`` for ``2.13.0+cpu``, which it matches): the
    extension's ABI is that torch's, and a bare "torch" would let pip swap in
    another (and from PyPI, a multi-GB CUDA build)."""
    torch_release = torch.__version__.split("+", 1)[0]
    return [f"torch=={torch_release}"] + [r for r in _requirements("requirements.txt") if _name(r) != "torch"]


# Optional parts. `python -m dist_rec.train` and `python -m dist_rec.fault.launch`
# need none of them, only install_requires (PyYAML for configs, matplotlib for
# the training plot, scipy for the RecShard planner's MILP); each extra's code
# imports it when used.
# There is no "ft" extra: the fault-tolerant launcher is dist_rec's own
# (dist_rec.fault), not torchft.
_EXTRAS = {
    # Parquet data files. The release tested with is pinned in requirements-dev.txt.
    "parquet": ["pyarrow"],
    # The peers we test and benchmark against, and TorchRec's own dependencies.
    # fbgemm-gpu-cpu and torchrec MUST be installed with --no-deps, as the
    # Makefile does (`pip install --no-deps -r requirements-interop.txt`):
    # torchrec declares fbgemm-gpu (the CUDA build), and their declared
    # dependencies would replace our pinned CPU torch with another build. So
    # `pip install .[interop]` is not the way to get them; this extra records
    # what they are.
    "interop": _requirements("requirements-interop.txt")
    + [r for r in _requirements("requirements-dev.txt") if _name(r) in ("tensordict", "torchmetrics", "tqdm", "pyre-extensions")],
    # DeepSpeed on the CPU accelerator; install it as the Makefile does, with
    # --no-deps --no-build-isolation and DS_ACCELERATOR=cpu DS_BUILD_OPS=0
    # DS_BUILD_SHM_COMM=1 (requirements-deepspeed.txt says why).
    "deepspeed": _requirements("requirements-deepspeed.txt"),
    "dev": _requirements("requirements-dev.txt"),
}


setup(
    name="dist_rec",
    version="0.1.0",
    description="Fused, sharded embedding training for recommendation models (DLRM) on CPUs and GPUs",
    packages=find_packages(include=["dist_rec", "dist_rec.*"]),
    python_requires=">=3.10",
    install_requires=_install_requires(),
    extras_require=_EXTRAS,
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
