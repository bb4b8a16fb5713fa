"""What the compiler made of the CPU kernels' inner loops.

A row's accumulators must stay in registers: GCC once kept an array of 8 AVX2
registers on the stack, zeroed it with `rep stos` and copied it out through
memory at every segment, which cost the backward a sixth of its time
(docs/kernels.md, Instruction sets). Nothing in the results shows it, so the
machine code of the built extension is read here."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

import dist_rec._C as extension

# Every function of every ISA build (namespace dist_rec::cpu::<isa>): which of
# the per-row loops stand alone and which are inlined is GCC's choice.
KERNEL = re.compile(r"dist_rec::cpu::(avx2|avx512|scalar)::")
# `rep stos`, or a call or tail call to memset (PLT, GOT or `callq` spellings).
STACK_FILL = re.compile(r"\brep stos|\b(call|jmp)q?\s.*<memset")


def _kernel_functions() -> dict:
    objdump = shutil.which("objdump")
    if objdump is None:  # binutils comes with the compiler that built the extension
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", extension.__file__], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    functions, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1) if KERNEL.search(header.group(1)) else None
            if name is not None:
                functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return functions


def test_the_kernels_were_found():
    functions = _kernel_functions()
    isas = {KERNEL.search(name).group(1) for name in functions}
    expected = {"scalar", "avx2", "avx512"} if platform.machine() == "x86_64" else {"scalar"}
    assert expected <= isas and len(functions) > 10, sorted(functions)[:5]
    names = " ".join(functions)
    assert "update_segments" in names and "pool_bag" in names  # the loops this guards, as GCC built them today


def test_no_kernel_fills_an_accumulator_array_on_the_stack():
    functions = _kernel_functions()
    assert len(functions) > 10  # a stripped or renamed build must not pass unread
    offenders = {name: [line for line in body if STACK_FILL.search(line)] for name, body in functions.items()}
    offenders = {name: lines for name, lines in offenders.items() if lines}
    assert not offenders, "\n".join(f"{name}: {lines[0].strip()}" for name, lines in offenders.items())
