"""Fixtures shared across the test tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable, Dict, List

import pytest


@pytest.fixture(autouse=True)
def _keep_the_test_process_allocator(monkeypatch):
    """``setup_environment`` sets glibc's malloc up for training
    (``train.keep_freed_memory``), process-wide and for good: in the pytest
    process a stand-in that changes nothing takes its place, so that the
    rest of the session keeps glibc's defaults. Tests of the setting itself
    run it in processes of their own."""
    import dist_rec.trainer.environment as environment

    monkeypatch.setattr(environment, "keep_freed_memory", lambda *args, **kwargs: 0)


@pytest.fixture(scope="session")
def machine_code() -> Callable[[str, str], Dict[str, List[str]]]:
    """``machine_code(library, name_pattern)``: the disassembled lines of each
    function of a built library whose demangled name matches the pattern
    (objdump). For tests of what the compiler made of a hot loop, which no
    result shows."""
    objdump = shutil.which("objdump")
    if objdump is None:  # binutils comes with the compiler that builds the extension
        pytest.skip("objdump (binutils) is not installed")

    def functions(library: str, name_pattern: str) -> Dict[str, List[str]]:
        listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        found, name = {}, None
        for line in listing.splitlines():
            header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
            if header:
                name = header.group(1) if re.search(name_pattern, header.group(1)) else None
                if name is not None:
                    found[name] = []
            elif name is not None:
                found[name].append(line)
        return found

    return functions


@pytest.fixture(scope="session")
def stack_fill() -> re.Pattern:
    """A `rep stos`, or a call or tail call to memset (PLT, GOT or `callq`
    spellings): how GCC zeroes an array it kept on the stack."""
    return re.compile(r"\brep stos|\b(call|jmp)q?\s.*<memset")
