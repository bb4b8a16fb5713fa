"""A loop-simple, plain-PyTorch reference of the Shampoo algorithm.

Written line by line from ``docs/shampoo.md``, section "The algorithm, exactly",
as an independent oracle for ``dist_rec.optim.DistributedShampoo``. It imports
nothing from ``dist_rec``; readability comes before speed everywhere (explicit
loops over parameters, blocks and dimensions). Meant to be run in float64.

Where the text can be read more than one way, the most literal reading is taken
and a comment starting with ``READING:`` says so.
"""

import itertools
import math

import torch

GRAFTINGS = ("adagrad", "rmsprop", "adam", "sgd", "none")


# --------------------------------------------------------------------------- blocks


def merged_shape_of(shape, max_preconditioner_dim):
    """Steps 1 (squeeze) and 2 (merge) of "Blocks"."""
    # 1. squeeze: drop every dimension of size 1.
    # READING: only size-1 dimensions are dropped (a size-0 dimension is kept).
    squeezed = []
    for n in shape:
        if n != 1:
            squeezed.append(n)

    # 2. merge: walk left to right with a running merged dimension; the next dimension is
    # multiplied into it while the product stays <= max_preconditioner_dim, otherwise the
    # next dimension starts a new merged dimension.
    # READING: a dimension that is by itself larger than the max still just starts its own
    # merged dimension (the split below cuts it), and nothing is merged into it afterwards
    # because any product with it is larger than the max too.
    merged = []
    for n in squeezed:
        if len(merged) > 0 and merged[-1] * n <= max_preconditioner_dim:
            merged[-1] = merged[-1] * n
        else:
            merged.append(n)
    return tuple(merged)


def blocks_of(shape, max_preconditioner_dim):
    """All blocks of a parameter of shape ``shape``.

    Returns ``(blocks, merged_shape)``: ``blocks`` is a list, each block a tuple with one
    ``(start, stop)`` pair per merged dimension (an empty tuple for the single 0-d block of
    a one-element parameter), ordered lexicographically (last dimension fastest).
    """
    merged = merged_shape_of(shape, max_preconditioner_dim)

    # 3. split: every merged dimension n is cut into consecutive pieces of
    # max_preconditioner_dim (the last one shorter).
    pieces_per_dim = []
    for n in merged:
        pieces = []
        start = 0
        while start < n:
            stop = min(start + max_preconditioner_dim, n)
            pieces.append((start, stop))
            start = stop
        pieces_per_dim.append(pieces)

    # all combinations, lexicographic order, last dimension fastest (itertools.product
    # enumerates exactly in that order; with no dimensions it yields one empty tuple).
    blocks = []
    for combination in itertools.product(*pieces_per_dim):
        blocks.append(tuple(combination))
    return blocks, merged


def block_slices(block):
    """The indexing tuple that cuts ``block`` out of a tensor of the merged shape."""
    slices = []
    for start, stop in block:
        slices.append(slice(start, stop))
    return tuple(slices)


# --------------------------------------------------------------------- linear algebra


def contract_all_but(G, i):
    """``contract(G, G, over all dimensions but i)``: an ``n_i x n_i`` matrix.

    Move dimension i to the front, flatten the rest: X is ``n_i x (product of the others)``,
    and the contraction over all the other dimensions is ``X @ X^T``.
    """
    n_i = G.shape[i]
    X = G.movedim(i, 0).reshape(n_i, -1)
    return X @ X.T


def multiply_dim(D, R, i):
    """``D x_i R``: multiply dimension i of D by the (symmetric) matrix R.

    Move dimension i to the front, flatten the rest, ``R @ X``, unflatten, move it back.
    """
    n_i = D.shape[i]
    X = D.movedim(i, 0)
    front_shape = X.shape
    Y = R @ X.reshape(n_i, -1)
    Y = Y.reshape(front_shape)
    return Y.movedim(0, i)


def _eigh_checked(A):
    """``torch.linalg.eigh(A)``, or None when it raises or gives non-finite values."""
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(A)
    except Exception:  # torch.linalg.LinAlgError and friends
        return None
    # READING: "gives non-finite values" is checked on the decomposition itself (the
    # eigenvalues and eigenvectors), not on the root computed from it afterwards.
    if not bool(torch.isfinite(eigenvalues).all()) or not bool(torch.isfinite(eigenvectors).all()):
        return None
    return eigenvalues, eigenvectors


def inverse_root(A, r, epsilon):
    """``inverse_root(A, r)`` of the spec, or None when the decomposition fails twice.

    ``A = Q diag(l) Q^T``; ``l' = l - min(min(l), 0) + epsilon``; the root is
    ``Q diag(l'^(-1/r)) Q^T``. A failed decomposition is retried in float64; the result
    comes back in A's dtype. The caller keeps the previous root on None and counts it.
    """
    decomposition = _eigh_checked(A)
    if decomposition is None:
        decomposition = _eigh_checked(A.to(torch.float64))
    if decomposition is None:
        return None
    l, Q = decomposition
    shift = min(float(l.min()), 0.0)  # a shift only when the smallest eigenvalue is negative
    l_damped = l - shift + epsilon
    root = Q @ torch.diag(l_damped ** (-1.0 / r)) @ Q.T
    return root.to(A.dtype)


def root_order(k, inv_root_override):
    """``r`` for a block of order ``k`` (its number of dimensions)."""
    if isinstance(inv_root_override, (list, tuple)):
        # a list [n_1, n_2, ...]: r = n_k for blocks of order k (1-based: n_1 is for order 1);
        # an entry of 0, or an order beyond the list, keeps 2 k.
        # READING: a 0-d block has order 0, which has no entry (the list starts at n_1);
        # it has no dimensions, so r is never used for it anyway.
        if 1 <= k <= len(inv_root_override) and inv_root_override[k - 1] != 0:
            return inv_root_override[k - 1]
        return 2 * k
    if inv_root_override == 0:
        return 2 * k
    return inv_root_override


def statistics_dtype(param_dtype):
    """Factors, roots and grafting state: the parameter's dtype, or float32 for lower precision."""
    if param_dtype in (torch.float64, torch.float32):
        return param_dtype
    return torch.float32


# ------------------------------------------------------------------------ optimizer


class ReferenceShampoo:
    """One parameter group of Shampoo, exactly as the spec's "Per step" list.

    ``params``: a list of tensors (float64), updated in place by ``step(grads)``.
    ``state[j]`` holds parameter j's step count ``t``, its merged shape and its blocks; every
    block is a dict with ``block`` (the (start, stop) pairs), ``F`` (factors), ``R`` (roots),
    ``A`` (grafting state or None), ``M`` (first moment or None), ``B`` (momentum or None).
    ``root_failures`` counts the inverse roots that failed twice (previous root kept).
    """

    # READING: the spec gives no default for lr; 1e-2 is the example's value (and the
    # published implementation's default).
    def __init__(
        self,
        params,
        lr=1e-2,
        betas=(0.9, 1.0),
        epsilon=1e-12,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        use_decoupled_weight_decay=True,
        max_preconditioner_dim=1024,
        precondition_frequency=1,
        start_preconditioning_step=-1,
        use_bias_correction=True,
        grafting="adagrad",
        grafting_epsilon=1e-10,
        grafting_beta2=1.0,
        inv_root_override=0,
        max_grad_norm=None,
    ):
        if grafting not in GRAFTINGS:
            raise ValueError(f"grafting must be one of {GRAFTINGS}, got {grafting!r}")
        self.params = list(params)
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.epsilon = epsilon
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.use_decoupled_weight_decay = use_decoupled_weight_decay
        self.max_preconditioner_dim = max_preconditioner_dim
        self.precondition_frequency = precondition_frequency
        # start_preconditioning_step = -1 means start = precondition_frequency.
        if start_preconditioning_step == -1:
            self.start = precondition_frequency
        else:
            self.start = start_preconditioning_step
        self.use_bias_correction = use_bias_correction
        self.grafting = grafting
        self.grafting_epsilon = grafting_epsilon
        self.grafting_beta2 = grafting_beta2
        self.inv_root_override = inv_root_override
        self.max_grad_norm = max_grad_norm
        self.root_failures = 0

        self.state = []
        for p in self.params:
            self.state.append(self._initial_state(p))

    def _initial_state(self, p):
        dtype = statistics_dtype(p.dtype)
        blocks, merged = blocks_of(tuple(p.shape), self.max_preconditioner_dim)
        block_states = []
        for block in blocks:
            block_shape = []
            for start, stop in block:
                block_shape.append(stop - start)
            block_shape = tuple(block_shape)
            F = []
            R = []
            for n_i in block_shape:
                F.append(torch.zeros(n_i, n_i, dtype=dtype))  # factors start at zero
                R.append(torch.eye(n_i, dtype=dtype))  # roots start as identity matrices
            A = None
            if self.grafting in ("adagrad", "rmsprop", "adam"):
                A = torch.zeros(block_shape, dtype=dtype)
            M = None
            if self.beta1 > 0:
                M = torch.zeros(block_shape, dtype=dtype)
            B = None
            if self.momentum > 0:
                B = torch.zeros(block_shape, dtype=dtype)
            block_states.append(
                {"block": block, "shape": block_shape, "k": len(block_shape), "F": F, "R": R, "A": A, "M": M, "B": B}
            )
        return {"t": 0, "merged_shape": merged, "blocks": block_states}

    @torch.no_grad()
    def step(self, grads):
        """One step. ``grads[j]`` is parameter j's gradient, or None to skip parameter j."""
        if len(grads) != len(self.params):
            raise ValueError("one gradient (or None) per parameter")
        # The gradients given are never modified: work on copies.
        work = []
        for g in grads:
            work.append(None if g is None else g.detach().clone())

        # 1. clip: N = the 2-norm of all gradients of the group taken together.
        # READING: "all gradients" are the ones that are not None.
        if self.max_grad_norm is not None:
            squares = 0.0
            for g in work:
                if g is not None:
                    squares += float((g.to(torch.float64) ** 2).sum())
            N = math.sqrt(squares)
            if N > self.max_grad_norm:
                for j in range(len(work)):
                    if work[j] is not None:
                        work[j] = work[j] * (self.max_grad_norm / N)

        for j in range(len(self.params)):
            if work[j] is None:
                continue  # skipped: its t does not advance
            self._step_parameter(self.params[j], work[j], self.state[j])

    def _step_parameter(self, p, g, state):
        state["t"] += 1
        t = state["t"]
        dtype = statistics_dtype(p.dtype)

        # 2. L2 weight decay (weight_decay > 0 and not decoupled).
        if self.weight_decay > 0 and not self.use_decoupled_weight_decay:
            g = g + self.weight_decay * p

        # The gradient and the parameter are viewed with the merged shape and cut the same way.
        merged = state["merged_shape"]
        g_view = g.reshape(merged)
        p_view = p.view(merged)  # a view: writing into its blocks updates p in place

        # Whether the roots are recomputed on this step, and c of the roots' bias correction.
        compute_roots = t >= self.start and (t - self.start) % self.precondition_frequency == 0
        if self.use_bias_correction and self.beta2 < 1:
            c = 1 - self.beta2**t
        else:
            c = 1.0
        # w of the factors' update.
        w = 1.0 if self.beta2 == 1 else 1 - self.beta2

        for bs in state["blocks"]:
            index = block_slices(bs["block"])
            # READING: the whole block computation runs in the statistics dtype; the update X
            # is cast back to the parameter's dtype (a no-op in float64).
            G = g_view[index].to(dtype)
            P_slot = p_view[index]
            P = P_slot.to(dtype)
            k = bs["k"]

            # 3.1 factors: F_i <- beta2 F_i + w contract(G, G, over all dimensions but i).
            for i in range(k):
                bs["F"][i] = self.beta2 * bs["F"][i] + w * contract_all_but(G, i)

            # 3.2 grafting state A.
            if self.grafting == "adagrad":
                # READING: adagrad ignores grafting_beta2 (A <- A + G^2 as written).
                bs["A"] = bs["A"] + G**2
            elif self.grafting in ("rmsprop", "adam"):
                # READING: literally (1 - grafting_beta2), with no "w = 1 when beta2 == 1" rule as
                # the factors have: with grafting_beta2 == 1, A stays zero.
                bs["A"] = self.grafting_beta2 * bs["A"] + (1 - self.grafting_beta2) * G**2

            # 3.3 first moment.
            if self.beta1 > 0:
                bs["M"] = self.beta1 * bs["M"] + (1 - self.beta1) * G
                if self.use_bias_correction:
                    D = bs["M"] / (1 - self.beta1**t)
                else:
                    D = bs["M"]
            else:
                D = G

            # 3.4 roots.
            if compute_roots:
                r = root_order(k, self.inv_root_override)
                for i in range(k):
                    root = inverse_root(bs["F"][i] / c, r, self.epsilon)
                    if root is None:
                        self.root_failures += 1  # keep the previous root
                    else:
                        bs["R"][i] = root

            # 3.5 grafting direction D_g.
            if self.grafting in ("adagrad", "rmsprop"):
                D_g = D / (torch.sqrt(bs["A"]) + self.grafting_epsilon)
            elif self.grafting == "adam":
                if self.use_bias_correction:
                    D_g = D / (torch.sqrt(bs["A"] / (1 - self.grafting_beta2**t)) + self.grafting_epsilon)
                else:
                    D_g = D / (torch.sqrt(bs["A"]) + self.grafting_epsilon)
            else:  # "sgd", "none"
                D_g = D

            # 3.6 direction.
            if t < self.start:
                X = D_g
            else:
                # S = D x_0 R_0 x_1 R_1 ... x_{k-1} R_{k-1}; for a 0-d block S = D.
                S = D
                for i in range(k):
                    S = multiply_dim(S, bs["R"][i], i)
                if self.grafting != "none":
                    norm_S = float(torch.linalg.vector_norm(S))
                    norm_D_g = float(torch.linalg.vector_norm(D_g))
                    if norm_S == 0:
                        X = S
                    else:
                        X = S * (norm_D_g / norm_S)
                else:
                    X = S

            # 3.7 decoupled weight decay.
            if self.weight_decay > 0 and self.use_decoupled_weight_decay:
                X = X + self.weight_decay * P

            # 3.8 momentum.
            # READING: B starts at zero, so the first step's B is (1 - dampening) X (unlike
            # torch.optim.SGD, whose first buffer is the undamped gradient).
            if self.momentum > 0:
                bs["B"] = self.momentum * bs["B"] + (1 - self.dampening) * X
                if self.nesterov:
                    X = X + self.momentum * bs["B"]
                else:
                    X = bs["B"]

            # 3.9 update: P <- P - lr X.
            P_slot.copy_(P - self.lr * X)
