"""DistributedShampoo on a GPU: CUDA parameters against the CPU reference,
and the distributed path over NCCL."""

import pytest
import torch

from dist_rec.optim import DDPShampooConfig, DistributedShampoo
from dist_rec.testing.multi_process import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(1,), (20,), (12, 9), (2, 3, 5), (4, 3, 6)]
SETTINGS = dict(lr=0.05, max_preconditioner_dim=8, epsilon=1e-6, betas=(0.9, 0.99), momentum=0.5, precondition_frequency=2)


def _grads(params, step):
    g = torch.Generator().manual_seed(step)
    return [0.5 * p.detach().cpu() + torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


def test_cuda_equals_the_reference():
    from shampoo_reference import ReferenceShampoo  # not at the top: spawned ranks import this module

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ours = [p.cuda().requires_grad_(True) for p in start]
    theirs = [p.clone() for p in start]
    optimizer, reference = DistributedShampoo(ours, **SETTINGS), ReferenceShampoo(theirs, **SETTINGS)
    for step in range(40):
        grads = _grads(theirs, step)
        for p, grad in zip(ours, grads):
            p.grad = grad.cuda()
        optimizer.step()
        reference.step(grads)
    worst = max(float((p.detach().cpu() - q).abs().max()) for p, q in zip(ours, theirs))
    assert worst <= 1e-10


def _nccl_rank(port: int, out: str) -> None:
    import torch.distributed as dist

    from dist_rec.distributed import destroy_process_group, init_process_group

    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    init_process_group("nccl", rank=0, world_size=1, store=store)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in SHAPES]
    distributed = [p.cuda().requires_grad_(True) for p in start]
    plain = [p.cuda().requires_grad_(True) for p in start]
    a = DistributedShampoo(distributed, **SETTINGS, distributed_config=DDPShampooConfig(communication_dtype=torch.float32))
    b = DistributedShampoo(plain, **SETTINGS)
    for step in range(10):
        for p, q, grad in zip(distributed, plain, _grads(plain, step)):
            p.grad, q.grad = grad.float().cuda(), grad.float().cuda()
        a.step()
        b.step()
    state = a.state_dict()  # the collective gather over NCCL
    torch.save({"worst": max(float((p - q).abs().max()) for p, q in zip(distributed, plain)),
                "blocks": sum(len(e["blocks"]) for e in state["state"].values())}, out)
    destroy_process_group()


def test_distributed_path_over_nccl(tmp_path):
    """One GPU, so one NCCL rank: the all-gather and the state gather run
    on CUDA tensors through NCCL and change nothing."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = str(tmp_path / "result.pt")
    process = ctx.Process(target=_nccl_rank, args=(free_port(), out))
    process.start()
    process.join(120)
    assert process.exitcode == 0
    result = torch.load(out)
    assert result["worst"] == 0.0
    assert result["blocks"] == len(DistributedShampoo([torch.zeros(s) for s in SHAPES], max_preconditioner_dim=8).blocks)
