"""Every CUDA source compiles (nvcc, compile only): CI has no GPU, but a
syntax or type error in a .cu file must still fail it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    return next((str(c) for c in candidates if c.exists()), None)


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no .cu files under csrc/"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_with_nvcc(source, tmp_path):
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}"]
    cmd = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(tmp_path / "out.o"),
        "-std=c++20",
        "--expt-relaxed-constexpr",
        # A CPU-only torch ships the CUDA headers but not this generated one.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        # The flags torch's CUDAExtension compiles with.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-gencode=arch=compute_90,code=sm_90",
        "-Xcompiler",
        "-fPIC",
        *includes,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-6000:]}"
