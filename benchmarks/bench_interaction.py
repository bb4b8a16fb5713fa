"""DLRM's dot interaction: the fused ``dist_rec.ops.dot_interaction`` (each
CPU build this machine runs) against its plain-PyTorch reference (``bmm`` +
``index_select`` + ``cat``, what TorchRec's ``InteractionArch`` also
computes), forward and backward, one thread.

Every variant runs in turn, ``--rounds`` times ``--calls`` calls each;
reported: the median over rounds of the mean call time, and the reference's
time over the fused op's.

Usage::

    python benchmarks/bench_interaction.py
    python benchmarks/bench_interaction.py --batch 1024 --features 26 --dim 16 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# harness first: it puts this checkout's dist_rec ahead of an installed one.
from harness import command_line, machine_summary, markdown_table, median_fields, run_rounds, update_section
from dist_rec.ops.interaction import dot_interaction_reference

ops = torch.ops.dist_rec


def _timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def measure(batch: int, features: int, dim: int, rounds: int, calls: int) -> dict:
    """``{variant: {"forward": ms, "backward": ms}}`` (medians over rounds)."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(batch, dim, generator=g)
    sparse = torch.randn(batch, features * dim, generator=g)
    grad = torch.randn(batch, dim + (features + 1) * features // 2, generator=g)
    ref_dense, ref_sparse = dense.clone().requires_grad_(), sparse.clone().requires_grad_()

    def reference_backward():
        ref_dense.grad = ref_sparse.grad = None
        dot_interaction_reference(ref_dense, ref_sparse).backward(grad)

    variants = {}
    for isa in ops._supported_cpu_isas():

        def select(isa=isa):
            ops._set_cpu_isa(isa)

        variants[f"fused ({isa})"] = (
            select,
            lambda: ops.dot_interaction(dense, sparse),
            lambda: ops.dot_interaction_backward(grad, dense, sparse),
        )
    variants["reference"] = (lambda: ops._set_cpu_isa(""), lambda: dot_interaction_reference(dense, sparse), None)

    def time_variant(name: str, round_index: int) -> dict:
        select, forward, backward = variants[name]
        select()
        for _ in range(3):
            forward()
        # The reference's backward runs through autograd.
        both = reference_backward if backward is None else (lambda: (forward(), backward()))
        return {"forward": _timed(forward, calls), "forward+backward": _timed(both, calls)}

    per_round = run_rounds(list(variants), rounds, time_variant, order="fixed")
    ops._set_cpu_isa("")
    return {name: median_fields(results) for name, results in per_round.items()}


def format_table(results: dict) -> str:
    ref = results["reference"]
    header = ["variant", "forward ms", "forward + backward ms", "reference / variant (forward + backward)"]
    cells = []
    for name, t in results.items():
        ratio = ref["forward+backward"] / t["forward+backward"]
        cells.append([name, f"{t['forward']:.3f}", f"{t['forward+backward']:.3f}", f"{ratio:.2f}x"])
    return markdown_table(header, cells)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--markdown", type=Path, help="rewrite the interaction section of this page")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.batch, args.features, args.dim, args.rounds, args.calls)
    table = format_table(results)
    print(table)
    if args.markdown:
        text = f"""## Dot interaction (CPU, one thread)

Machine: {machine_summary()}.

Command: `{command_line(__file__, argv)}`.

B={args.batch}, F={args.features} pooled embeddings + the dense vector, D={args.dim}, float32. Fused:
`torch.ops.dist_rec.dot_interaction` and its backward op, per CPU build; reference:
`dist_rec.ops.interaction.dot_interaction_reference` (`bmm`, `index_select` of the upper triangle,
`cat`; its backward through autograd). Medians over {args.rounds} rounds of {args.calls} calls, variants in turn.

{table}
"""
        update_section(args.markdown, "interaction", text)


if __name__ == "__main__":
    main()
