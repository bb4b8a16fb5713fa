"""What the compiler made of the CPU kernels' inner loops.

A row's accumulators must stay in registers: GCC once kept an array of 8 AVX2
registers on the stack, zeroed it with `rep stos` and copied it out through
memory at every segment, which cost the backward a sixth of its time
(docs/kernels.md, Instruction sets). Nothing in the results shows it, so the
machine code of the built extension is read here."""

from __future__ import annotations

import platform
import re

import dist_rec._C as extension

# Every function of every ISA build (namespace dist_rec::cpu::<isa>): which of
# the per-row loops stand alone and which are inlined is GCC's choice.
KERNEL = re.compile(r"dist_rec::cpu::(avx2|avx512|scalar)::")


def test_the_kernels_were_found(machine_code):
    functions = machine_code(extension.__file__, KERNEL.pattern)
    isas = {KERNEL.search(name).group(1) for name in functions}
    expected = {"scalar", "avx2", "avx512"} if platform.machine() == "x86_64" else {"scalar"}
    assert expected <= isas and len(functions) > 10, sorted(functions)[:5]
    names = " ".join(functions)
    assert "update_table_segments" in names and "pool_bag" in names  # the loops this guards, as GCC built them today


def test_no_kernel_fills_an_accumulator_array_on_the_stack(machine_code, stack_fill):
    functions = machine_code(extension.__file__, KERNEL.pattern)
    assert len(functions) > 10  # a stripped or renamed build must not pass unread
    offenders = {name: [line for line in body if stack_fill.search(line)] for name, body in functions.items()}
    offenders = {name: lines for name, lines in offenders.items() if lines}
    assert not offenders, "\n".join(f"{name}: {lines[0].strip()}" for name, lines in offenders.items())
