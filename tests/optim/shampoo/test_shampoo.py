"""DistributedShampoo against the loop-simple reference written from
docs/shampoo.md (float64, many shapes and settings, 40+ steps), plus its
validation, blocking, root fallback and state_dict round trip."""

import pytest
import torch

from dist_rec.optim import DistributedShampoo
from dist_rec.optim.shampoo import inverse_root, matrix_functions, merged_shape, param_blocks
from shampoo_reference import ReferenceShampoo, blocks_of

# 0-d (one element), 1-D, 2-D, 3-D; dims that merge ((2,3,5) -> (6,5) at 8)
# and dims that split (20 -> 8, 8, 4); size-1 dims that squeeze away.
SHAPES = [(1,), (7,), (20,), (5, 3), (12, 9), (2, 3, 5), (3, 1, 4, 2), (1, 17), (4, 3, 6)]
MAX_DIM = 8
STEPS = 42


def _problem(seed: int, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    targets = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return params, targets, g


def _grads(params, targets, g, skip=None):
    """A quadratic pull towards a target plus noise: gradients that depend
    on where the parameters are. ``skip`` gives a parameter no gradient."""
    grads = []
    for i, (p, target) in enumerate(zip(params, targets)):
        if i == skip:
            grads.append(None)
        else:
            grads.append(0.5 * (p - target) + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return grads


def _run_both(settings, seed=0, steps=STEPS, shapes=SHAPES, skip_every=0):
    params, targets, g = _problem(seed, shapes)
    ours = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone() for p in params]
    optimizer = DistributedShampoo(ours, **settings)
    reference = ReferenceShampoo(theirs, **settings)
    worst = 0.0
    for step in range(steps):
        skip = (step % len(shapes)) if skip_every and step % skip_every == 0 else None
        grads = _grads(theirs, targets, g, skip)
        for p, grad in zip(ours, grads):
            p.grad = None if grad is None else grad.clone()
        optimizer.step()
        reference.step(grads)
        for p, q in zip(ours, theirs):
            worst = max(worst, float((p.detach() - q).abs().max()))
    return worst, optimizer, reference


# epsilon: at the published default (1e-12) a factor that is still rank
# deficient (fewer steps than its side) has eigenvalues of pure rounding noise
# next to epsilon, and a direction with a component outside the factor's range
# (statistics older than the gradient, precondition_frequency > 1) is scaled
# by epsilon^(-1/r) there: two correct implementations then differ by about
# 1e-16 / epsilon. 1e-6 keeps the comparison about the algorithm, not that
# conditioning; `test_equals_reference_at_the_default_epsilon` covers 1e-12.
BASE = dict(lr=0.05, max_preconditioner_dim=MAX_DIM, epsilon=1e-6)

SETTINGS = {
    "defaults": dict(),
    "no-ema-sum": dict(betas=(0.0, 1.0)),
    "ema-beta2": dict(betas=(0.9, 0.99)),
    "no-beta1-ema-beta2": dict(betas=(0.0, 0.95)),
    "no-bias-correction": dict(betas=(0.9, 0.99), use_bias_correction=False, grafting="adam", grafting_beta2=0.999),
    "freq3": dict(precondition_frequency=3),
    "freq4-start6": dict(precondition_frequency=4, start_preconditioning_step=6),
    "start10": dict(start_preconditioning_step=10),
    "graft-rmsprop": dict(grafting="rmsprop", grafting_beta2=0.9, grafting_epsilon=1e-8),
    "graft-adam": dict(grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8, betas=(0.9, 0.999)),
    "graft-sgd": dict(grafting="sgd", lr=0.01),
    "graft-none": dict(grafting="none", lr=0.01, epsilon=1e-6),
    "momentum": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.8, nesterov=True),
    "l2-decay": dict(weight_decay=0.01, use_decoupled_weight_decay=False),
    "decoupled-decay": dict(weight_decay=0.01, use_decoupled_weight_decay=True, momentum=0.5),
    "clip": dict(max_grad_norm=1.0),
    "root-override-int": dict(inv_root_override=2),
    "root-override-list": dict(inv_root_override=[1, 0, 3], epsilon=1e-4),  # r=1 on vectors: a plain inverse
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_equals_reference(name):
    settings = dict(BASE, **SETTINGS[name])
    worst, optimizer, reference = _run_both(settings)
    assert worst <= 1e-10, f"{name}: max |ours - reference| = {worst:.3e}"
    assert optimizer.root_failures() == reference.root_failures == 0


def test_equals_reference_at_the_default_epsilon():
    """Roots recomputed every step keep every direction inside the factors'
    range, so even epsilon = 1e-12 compares to 1e-10 (on matrix and 3-D
    blocks: 1-D blocks take epsilon^(-1/2), and rounding outside the range
    then reaches 1e-10 by itself)."""
    shapes = [(5, 3), (12, 9), (2, 3, 5), (4, 3, 6), (3, 1, 4, 2)]
    worst, _, _ = _run_both(dict(lr=0.05, max_preconditioner_dim=MAX_DIM, epsilon=1e-12, momentum=0.5), shapes=shapes)
    assert worst <= 1e-10, f"max |ours - reference| = {worst:.3e}"


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("max_dim", [4, 6, 1024])
def test_equals_reference_other_seeds_and_blockings(seed, max_dim):
    settings = dict(
        lr=0.05, max_preconditioner_dim=max_dim, betas=(0.9, 0.99), momentum=0.5, precondition_frequency=2, epsilon=1e-5
    )
    worst, _, _ = _run_both(settings, seed=seed)
    assert worst <= 1e-10, f"max |ours - reference| = {worst:.3e}"


def test_parameters_without_gradients_are_skipped_like_the_reference():
    worst, optimizer, _ = _run_both(dict(BASE, precondition_frequency=2), skip_every=3)
    assert worst <= 1e-10
    assert len(set(optimizer._steps)) > 1  # some parameters really missed steps


@pytest.mark.parametrize("shape", SHAPES + [(40,), (9, 16, 3), (1, 1), (1,)])
def test_blocks_match_the_reference(shape):
    ours = param_blocks(0, shape, MAX_DIM)
    blocks, merged = blocks_of(shape, MAX_DIM)
    assert merged_shape(shape, MAX_DIM) == tuple(merged)
    assert [tuple((s.start, s.stop) for s in b.slices) for b in ours] == [tuple(map(tuple, b)) for b in blocks]


def test_blocking_examples():
    assert merged_shape((2, 3, 5), 8) == (6, 5)
    assert merged_shape((8, 2), 8) == (8, 2)
    assert merged_shape((1, 17, 1), 8) == (17,)
    assert merged_shape((1, 1), 8) == ()
    shapes = [b.shape for b in param_blocks(0, (20, 3), 8)]
    assert shapes == [(8, 3), (8, 3), (4, 3)]


INVALID = [
    (dict(lr=-1.0), "Invalid lr=-1.0. Must be >= 0.0"),
    (dict(betas=(1.0, 1.0)), "Invalid betas[0]=1.0. Must be in [0.0, 1.0)"),
    (dict(betas=(0.9, 0.0)), "Invalid betas[1]=0.0. Must be in (0.0, 1.0]"),
    (dict(epsilon=0.0), "Invalid epsilon=0.0. Must be > 0.0"),
    (dict(momentum=1.0), "Invalid momentum=1.0. Must be in [0.0, 1.0)"),
    (dict(weight_decay=-0.1), "Invalid weight_decay=-0.1. Must be >= 0.0"),
    (dict(max_preconditioner_dim=0), "Invalid max_preconditioner_dim=0. Must be >= 1"),
    (dict(precondition_frequency=0), "Invalid precondition_frequency=0. Must be >= 1"),
    (dict(start_preconditioning_step=0), "Invalid start_preconditioning_step=0. Must be -1"),
    (dict(grafting="lion"), "Invalid grafting='lion'. Must be one of"),
    (dict(grafting_epsilon=0.0), "Invalid grafting_epsilon=0.0. Must be > 0.0"),
    (dict(grafting_beta2=1.5), "Invalid grafting_beta2=1.5. Must be in (0.0, 1.0]"),
    (dict(nesterov=True), "Invalid nesterov=True. Must be False when momentum=0.0"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm=0.0. Must be None or > 0.0"),
    (dict(inv_root_override=-2), "Invalid inv_root_override=-2. Must be an int >= 0"),
    (dict(distributed_config="yes"), "Invalid distributed_config='yes'. Must be None or a DDPShampooConfig"),
]


@pytest.mark.parametrize("settings,message", INVALID, ids=[next(iter(s)) for s, _ in INVALID])
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValueError) as error:
        DistributedShampoo([torch.zeros(3, requires_grad=True)], **settings)
    assert message in str(error.value)


def test_invalid_setting_in_a_parameter_group_is_refused():
    with pytest.raises(ValueError, match=r"Invalid lr=-0.5"):
        DistributedShampoo([{"params": [torch.zeros(3, requires_grad=True)], "lr": -0.5}])


def test_inverse_root_shifts_a_negative_eigenvalue_and_damps():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    eigenvalues = torch.tensor([-1e-3, 0.0, 2.0, 5.0], dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    expected = q @ torch.diag((eigenvalues + 1e-3 + 1e-4) ** -0.25) @ q.T
    assert torch.allclose(inverse_root(a, 4, 1e-4), expected, atol=1e-9)


def test_a_failed_root_is_retried_in_float64_then_kept(monkeypatch):
    real = matrix_functions._inverse_root_eigh
    calls = []

    def float32_fails(matrix, root, epsilon):
        calls.append(matrix.dtype)
        if matrix.dtype != torch.float64:
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix, root, epsilon)

    monkeypatch.setattr(matrix_functions, "_inverse_root_eigh", float32_fails)
    a = torch.eye(3) * 16
    assert torch.allclose(inverse_root(a, 4, 1e-12), torch.eye(3) / 2)
    assert calls == [torch.float32, torch.float64]

    p = torch.ones(3, 2, requires_grad=True)
    optimizer = DistributedShampoo([p], lr=0.1, betas=(0.0, 1.0), grafting="sgd", max_preconditioner_dim=3)
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    optimizer.step()
    roots = [r.clone() for r in optimizer._block_state[0]["roots"]]

    def always_fails(matrix, root, epsilon):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(matrix_functions, "_inverse_root_eigh", always_fails)
    optimizer.step()
    assert optimizer.root_failures() == 2  # both factors kept their root
    assert all(torch.equal(a, b) for a, b in zip(roots, optimizer._block_state[0]["roots"]))
    assert torch.isfinite(p).all()


def _fresh(seed=3):
    params, targets, g = _problem(seed)
    return [p.requires_grad_(True) for p in params], targets, g


def _advance(optimizer, params, targets, g, steps):
    for _ in range(steps):
        for p, grad in zip(params, _grads([p.detach() for p in params], targets, g)):
            p.grad = grad
        optimizer.step()


@pytest.mark.parametrize("settings", [dict(momentum=0.9, betas=(0.9, 0.99)), dict(grafting="adam", grafting_beta2=0.99)])
def test_state_dict_round_trip_is_exact(settings):
    settings = dict(BASE, precondition_frequency=3, **settings)
    params, targets, g = _fresh()
    optimizer = DistributedShampoo(params, **settings)
    _advance(optimizer, params, targets, g, 7)
    saved = optimizer.state_dict()
    clone_params = [p.detach().clone().requires_grad_(True) for p in params]
    restored = DistributedShampoo(clone_params, **dict(settings, lr=123.0))  # hyperparameters come from the state
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == settings["lr"]
    again = restored.state_dict()
    for i, entry in saved["state"].items():
        assert again["state"][i]["step"] == entry["step"]
        for j, block in entry["blocks"].items():
            for key, value in block.items():
                other = again["state"][i]["blocks"][j][key]
                if isinstance(value, list):
                    assert all(torch.equal(a, b) for a, b in zip(value, other))
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(value, other)
                else:
                    assert value == other
    g_copy = torch.Generator().set_state(g.get_state())
    _advance(optimizer, params, targets, g, 6)
    _advance(restored, clone_params, targets, g_copy, 6)
    for a, b in zip(params, clone_params):
        assert torch.equal(a, b)


def test_state_dict_is_a_copy():
    params, targets, g = _fresh()
    optimizer = DistributedShampoo(params, **BASE)
    _advance(optimizer, params, targets, g, 2)
    saved = optimizer.state_dict()
    before = saved["state"][4]["blocks"][0]["factors"][0].clone()
    _advance(optimizer, params, targets, g, 2)
    assert torch.equal(saved["state"][4]["blocks"][0]["factors"][0], before)


def test_mismatched_state_dicts_are_refused():
    params, targets, g = _fresh()
    optimizer = DistributedShampoo(params, **BASE)
    _advance(optimizer, params, targets, g, 2)
    saved = optimizer.state_dict()
    with pytest.raises(ValueError, match="max_preconditioner_dim=8; this optimizer uses 4"):
        DistributedShampoo([p.detach().clone().requires_grad_(True) for p in params], lr=0.05, max_preconditioner_dim=4).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"parameter groups of \[9\] parameters; this optimizer has \[8\]"):
        DistributedShampoo([p.detach().clone().requires_grad_(True) for p in params[:-1]], **BASE).load_state_dict(saved)
    other = [p.detach().clone().requires_grad_(True) for p in params]
    other[4] = torch.zeros(12, 10, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"parameter 4 block 1 \(shape \(8, 2\)\): saved factors"):
        DistributedShampoo(other, **BASE).load_state_dict(saved)
    with pytest.raises(ValueError, match="not a DistributedShampoo state_dict"):
        DistributedShampoo(params, **BASE).load_state_dict({"state": {}})


def test_trains_a_small_mlp_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = DistributedShampoo(model.parameters(), lr=0.01, max_preconditioner_dim=16, momentum=0.5)
    x, y = torch.randn(256, 10), torch.randn(256, 1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.state_bytes() > 0


def test_settings_table_covers_every_grafting_type():
    used = {SETTINGS[name].get("grafting", "adagrad") for name in SETTINGS}
    assert used == {"adagrad", "rmsprop", "adam", "sgd", "none"}
    assert any(len(s) == 3 for s in SHAPES) and any(len(s) == 1 for s in SHAPES)
