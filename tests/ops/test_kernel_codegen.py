"""What the compiler made of the CPU kernels' inner loops.

A row's accumulators must stay in registers: GCC once kept an array of 8 AVX2
registers on the stack, zeroed it with `rep stos` and copied it out through
memory at every segment, which cost the backward a sixth of its time
(docs/kernels.md, Instruction sets). Nothing in the results shows it, so the
machine code of the built extension is read here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import dist_rec._C as extension

# The per-row loops of every ISA build (namespace dist_rec::cpu::<isa>).
KERNEL = re.compile(r"dist_rec::cpu::(avx2|avx512|scalar)::(pool_bag|pool_columns|forward_bags|sum_grad|sum_segment_grad|update_segments)")
STACK_FILL = re.compile(r"\brep stos|call\s+[0-9a-f]+ <memset")


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
    assert "scalar" in isas and len(functions) > 10, sorted(functions)[:5]


def test_no_kernel_fills_an_accumulator_array_on_the_stack():
    offenders = {name: [line for line in body if STACK_FILL.search(line)] for name, body in _kernel_functions().items()}
    offenders = {name: lines for name, lines in offenders.items() if lines}
    assert not offenders, "\n".join(f"{name}: {lines[0].strip()}" for name, lines in offenders.items())
