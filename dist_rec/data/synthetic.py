"""A Criteo-like synthetic workload whose best achievable AUC is known.

Samples have dense features and multi-hot sparse features whose ids follow a
Zipf law (a few hot rows, a long tail), as in real click logs. Labels are
drawn from a planted *teacher*: every table row has a hidden scalar effect
and a hidden latent vector, the dense features have a hidden linear map, and

    logit = bias + scale * standardise(w . x + sum_f v_f(bag_f) + a * sum_{i<j} <z_i, z_j>)

where ``v_f``/``z_f`` are the mean of the bag's row effects/latents (shrunk
for rare rows, see ``signal_rows``), ``z_0`` is the dense latent and ``a``
the ``interaction_weight``. ``label ~ Bernoulli(sigmoid(logit))``. The
teacher's own probabilities are the Bayes-optimal predictor, so their AUC on
the evaluation set (``teacher_auc``) is the ceiling a trained model is
measured against. DLRM's pairwise dot interaction can express this teacher,
which keeps the gap a measure of training, not of model mismatch.

Everything is a function of ``seed``: samples are generated in fixed blocks
of ``block_size``, each from its own random stream keyed by (seed, split,
block), so a batch does not depend on the batch size, the rank or the world
size that asked for it, and ranks generate only their own samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dist_rec.data.batch import Batch, check_rank, kjt_from_sample_major, rank_block_ranges

_SPLITS = {"train": 0, "eval": 1, "calibration": 2}


@dataclass(kw_only=True)
class SyntheticConfig:
    """The workload.

    Args:
        num_embeddings_per_feature (List[int]): rows of each sparse feature's
            table (one table per feature); its length is the feature count.
        num_dense_features (int): dense features per sample. (Default: 13)
        zipf_exponent (float): s in P(rank k) ~ 1/k^s over each table's rows;
            0 is uniform. (Default: 1.1)
        mean_bag_length (float): mean ids per bag (1 = one-hot; above 1,
            1 + Poisson(mean - 1)). (Default: 1.0)
        missing_probability (float): chance a bag is empty (missing value).
            (Default: 0.02)
        teacher_dim (int): dimension of the teacher's row latents. (Default: 4)
        teacher_rows_cap (int): rows of a teacher table beyond this share
            latents (id mod cap), bounding the teacher's memory. (Default: 2**18)
        signal_rows (int): rarity at which a row's hidden effect and latent
            have shrunk to half: a row of Zipf rank k carries signal scaled
            by 1 / (1 + k / signal_rows), so rare ids say less (0: no
            shrinking). Keeps the teacher learnable from a finite stream.
            (Default: 50)
        interaction_weight (float): weight of the pairwise term against the
            first-order ones (each part has about unit variance before it).
            (Default: 0.3)
        logit_scale (float): standard deviation of the teacher's logits; sets
            how predictable labels are (the teacher's AUC). (Default: 1.6)
        click_rate (float): approximate mean label. (Default: 0.25)
        block_size (int): samples per random stream. (Default: 256)
        seed (int): everything derives from it. (Default: 0)
    """

    num_embeddings_per_feature: List[int]
    num_dense_features: int = 13
    zipf_exponent: float = 1.1
    mean_bag_length: float = 1.0
    missing_probability: float = 0.02
    teacher_dim: int = 4
    teacher_rows_cap: int = 2**18
    signal_rows: int = 50
    interaction_weight: float = 0.3
    logit_scale: float = 1.6
    click_rate: float = 0.25
    block_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = list(self.num_embeddings_per_feature)
        if not sizes or any(int(n) < 1 for n in sizes):
            raise ValueError(
                f"Invalid num_embeddings_per_feature={sizes}. Must be a non-empty list of positive row counts."
            )
        self.num_embeddings_per_feature = [int(n) for n in sizes]
        _require(self.num_dense_features >= 1, "num_dense_features", self.num_dense_features, ">= 1")
        _require(self.zipf_exponent >= 0, "zipf_exponent", self.zipf_exponent, ">= 0 (0 is uniform)")
        _require(self.mean_bag_length > 0, "mean_bag_length", self.mean_bag_length, "> 0")
        _require(0 <= self.missing_probability < 1, "missing_probability", self.missing_probability, "in [0, 1)")
        _require(self.teacher_dim >= 1, "teacher_dim", self.teacher_dim, ">= 1")
        _require(self.teacher_rows_cap >= 1, "teacher_rows_cap", self.teacher_rows_cap, ">= 1")
        _require(self.signal_rows >= 0, "signal_rows", self.signal_rows, ">= 0 (0: no shrinking)")
        _require(self.interaction_weight >= 0, "interaction_weight", self.interaction_weight, ">= 0")
        _require(self.logit_scale > 0, "logit_scale", self.logit_scale, "> 0")
        _require(0 < self.click_rate < 1, "click_rate", self.click_rate, "in (0, 1)")
        _require(self.block_size >= 1, "block_size", self.block_size, ">= 1")

    @property
    def num_sparse_features(self) -> int:
        return len(self.num_embeddings_per_feature)


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}. Must be {rule}.")


@dataclass
class _Block:
    dense: np.ndarray  # [n, D] float32
    lengths: np.ndarray  # [n, F] int64
    values: np.ndarray  # sample-major ids, int64
    sample_offsets: np.ndarray  # [n + 1] start of each sample's ids
    labels: np.ndarray  # [n] float32
    teacher_probability: np.ndarray  # [n] float64


class SyntheticDataset:
    """Generates the workload of a ``SyntheticConfig`` on the fly.

    ``split`` is "train" (an endless stream) or "eval" (the first
    ``num_samples`` samples of its own stream).

    Example::

        data = SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[1000] * 26))
        for batch in data.batches(batch_size=512, rank=0, world_size=2):
            ...
        data.teacher_auc(num_samples=100_000)   # the ceiling for eval AUC
    """

    # With drop_last every rank yields the same number of batches (the split
    # in dist_rec.data.batch): the trainer needs no per-step agreement.
    equal_batches_per_rank = True

    def __init__(self, config: SyntheticConfig, split: str = "train", num_samples: Optional[int] = None) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"Invalid split={split!r}. Must be 'train' or 'eval'.")
        if split == "eval" and (num_samples is None or num_samples < 1):
            raise ValueError(f"Invalid num_samples={num_samples!r}. Must be >= 1 for the eval split.")
        self.config = config
        self.split = split
        self.num_samples = num_samples
        self._teacher = _Teacher(config)
        self._cached: Tuple[Tuple[int, int], Optional[_Block]] = ((-1, 0), None)

    @property
    def sparse_feature_names(self) -> List[str]:
        return [f"cat_{i}" for i in range(self.config.num_sparse_features)]

    @property
    def num_dense_features(self) -> int:
        return self.config.num_dense_features

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("The train split of a SyntheticDataset is endless.")
        return self.num_samples

    def batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, start_step: int = 0
    ) -> Iterator[Batch]:
        """This rank's batches from global batch ``start_step`` on (every
        block of samples is generated from its own seed: a resume seeks)."""
        check_rank(rank, world_size)
        total = self.num_samples if self.num_samples is not None else 2**62
        for start, stop in rank_block_ranges(total, batch_size, rank, world_size, drop_last, start_step):
            yield self._batch(start, stop)

    def teacher_auc(self) -> float:
        """AUC of the teacher's probabilities on this (eval) split's labels."""
        from dist_rec.metrics import auc

        labels, probabilities = [], []
        for block in range(math.ceil(len(self) / self.config.block_size)):
            b = self._block(block)
            keep = min(len(b.labels), len(self) - block * self.config.block_size)
            labels.append(b.labels[:keep])
            probabilities.append(b.teacher_probability[:keep])
        return auc(torch.from_numpy(np.concatenate(probabilities)), torch.from_numpy(np.concatenate(labels)))

    def samples(self, start: int, stop: int) -> _Block:
        """Samples ``[start, stop)`` of the split as arrays (sample-major)."""
        size = self.config.block_size
        first = start // size
        blocks = self._blocks(first, (stop - 1) // size + 1 - first)
        return _slice(blocks, start - first * size, stop - first * size)

    def _batch(self, start: int, stop: int) -> Batch:
        b = self.samples(start, stop)
        return Batch(
            dense_features=torch.from_numpy(b.dense),
            sparse_features=kjt_from_sample_major(self.sparse_feature_names, b.values, b.lengths),
            labels=torch.from_numpy(b.labels),
        )

    def _block(self, index: int) -> _Block:
        return self._blocks(index, 1)

    def _blocks(self, first: int, count: int) -> _Block:
        """Blocks ``first .. first + count - 1`` as one (the last asked is kept)."""
        if self._cached[0] == (first, count):
            return self._cached[1]
        blocks = self._teacher.generate(_SPLITS[self.split], first, count)
        self._cached = ((first, count), blocks)
        return blocks


class _Teacher:
    """The hidden model, and sample generation from it."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 1_000_003])
        sizes = np.array(config.num_embeddings_per_feature, dtype=np.int64)
        self.sizes = sizes
        self.rows = np.minimum(sizes, config.teacher_rows_cap)
        self.row_base = np.concatenate([[0], np.cumsum(self.rows)[:-1]])
        k, num_features, num_dense = config.teacher_dim, len(sizes), config.num_dense_features
        total_rows = int(self.rows.sum())
        # Pairwise terms: (F + 1) * F / 2 dot products of k-dim latents; scale
        # latents so the interaction part carries about as much variance as
        # the first-order part.
        pairs = (num_features + 1) * num_features / 2
        latent_std = (1.0 / (pairs * k)) ** 0.25
        latents = (rng.standard_normal((total_rows, k)) * latent_std).astype(np.float64)
        effects = rng.standard_normal(total_rows) / math.sqrt(num_features)
        # Each teacher row's effect and latents side by side, and a row of zeros last (an empty bag's).
        self.row_terms = np.concatenate([np.concatenate([effects[:, None], latents], axis=1), np.zeros((1, 1 + k))])
        self.dense_map = rng.standard_normal((num_dense, k)) * latent_std / math.sqrt(num_dense)
        self.dense_weights = rng.standard_normal(num_dense) / math.sqrt(num_dense)
        # Ranks are scattered over row ids by a multiplier coprime to the size,
        # so hot rows are not all at the start of a table.
        self.multipliers = np.array([_coprime_near(int(n), 0.6180339887 * n) for n in sizes], dtype=np.int64)
        self.capped = bool((self.rows < sizes).any())
        self.zipf_spans = _zipf_span(sizes, config.zipf_exponent)  # per feature, not per id
        self.shifts = rng.integers(0, sizes)
        # Only bags of at most one id use them (mean_bag_length <= 1).
        table_bytes = int(sizes.sum()) * 8 * (2 + k)
        self.by_rank = _RankTables.build(self) if config.mean_bag_length <= 1.0 and table_bytes <= _RANK_TABLES_MAX_BYTES else None
        self.shift_mean, self.shift_std = 0.0, 1.0
        raw = self._raw_logits(_SPLITS["calibration"], 0, 16384)
        self.shift_mean, self.shift_std = float(raw.mean()), float(raw.std() or 1.0)
        self.bias = _bias_for_rate(config.logit_scale * (raw - self.shift_mean) / self.shift_std, config.click_rate)

    def generate(self, split: int, first: int, count: int = 1) -> _Block:
        """Blocks ``first .. first + count - 1`` of ``split`` as one block.

        Each block draws from its own stream, as always; the teacher's
        arithmetic then runs once over all of them. It works per sample,
        so the bits are those of block-by-block generation, at a fraction
        of the per-call cost of small arrays."""
        n = self.config.block_size
        draws = [self._draw(np.random.default_rng([self.config.seed, split, b]), n) for b in range(first, first + count)]
        dense, lengths, uniforms, label_uniforms = (np.concatenate(parts) if count > 1 else parts[0] for parts in zip(*draws))
        values, logits = self._teach(dense, lengths, uniforms)
        probability = 1.0 / (1.0 + np.exp(-logits))
        labels = (label_uniforms < probability).astype(np.float32)
        offsets = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1), out=offsets[1:])
        return _Block(dense, lengths, values, offsets, labels, probability)

    def _raw_logits(self, split: int, block: int, n: int) -> np.ndarray:
        dense, lengths, uniforms, _ = self._draw(np.random.default_rng([self.config.seed, split, block]), n)
        return self._teach(dense, lengths, uniforms, raw=True)[1]

    def _draw(self, rng: np.random.Generator, n: int):
        """A block's random draws, in their order: dense features, bag
        lengths (and missing bags), one uniform per id, one per label."""
        config = self.config
        num_features = len(self.sizes)
        dense = rng.standard_normal((n, config.num_dense_features), dtype=np.float32)

        mean = config.mean_bag_length
        if mean == 1.0:
            lengths = np.ones((n, num_features), dtype=np.int64)
        elif mean > 1.0:
            lengths = 1 + rng.poisson(mean - 1.0, size=(n, num_features))
        else:
            lengths = rng.poisson(mean, size=(n, num_features))
        if config.missing_probability > 0:
            lengths[rng.random((n, num_features)) < config.missing_probability] = 0
        uniforms = rng.random(int(lengths.sum()))
        return dense, lengths, uniforms, rng.random(n)

    def _teach(self, dense: np.ndarray, lengths: np.ndarray, uniforms: np.ndarray, raw: bool = False):
        """The ids (from their uniforms) and the teacher's logits of samples."""
        config = self.config
        n, num_features = lengths.shape
        flat_lengths = lengths.reshape(-1)
        # The dense latent and the pooled latents, feature-major: [F + 1, n, k].
        stack = np.empty((num_features + 1, n, config.teacher_dim))
        if self.by_rank is not None and flat_lengths.size and flat_lengths.max() <= 1:
            values, effects = self.by_rank.one_hot(self, lengths, uniforms, latents_out=stack[1:])
        else:
            values, means = self._values_and_means(lengths, uniforms)
            effects = means[:, 0].reshape(n, num_features)
            stack[1:] = means[:, 1:].reshape(n, num_features, config.teacher_dim).transpose(1, 0, 2)
        dense64 = dense.astype(np.float64)
        np.matmul(dense64, self.dense_map, out=stack[0])
        # Their sum over the F + 1 vectors, in order (a reduction over the
        # outer axis adds whole rows one after another), and the sum of their
        # squares reduced per sample over one [n, F + 1, k] array: the bits
        # of the sums over the concatenated vectors this was first written with.
        if n * config.teacher_dim > 1:
            total = np.add.reduce(stack, axis=0)
        else:  # one value per vector: a reduction over that one axis would be numpy's pairwise sum
            total = stack[0].copy()
            for row in stack[1:]:
                total += row
        by_sample = stack.transpose(1, 0, 2)
        squares = np.empty(by_sample.shape)
        np.multiply(by_sample, by_sample, out=squares)
        pairwise = 0.5 * ((total * total).sum(axis=1) - squares.sum(axis=(1, 2)))
        raw_logits = dense64 @ self.dense_weights + effects.sum(axis=1)
        raw_logits = raw_logits + config.interaction_weight * pairwise
        logits = raw_logits if raw else self.bias + config.logit_scale * (raw_logits - self.shift_mean) / self.shift_std
        return values, logits

    def _values_and_means(self, lengths: np.ndarray, uniforms: np.ndarray):
        """The ids (from their uniforms) and each bag's mean of ``signal *
        row_terms[teacher row]``, per id."""
        config = self.config
        n, num_features = lengths.shape
        flat_lengths = lengths.reshape(-1)
        if flat_lengths.size and flat_lengths.max() <= 1:  # one-hot bags: a value's bag is where a length is 1
            bag_of_value = np.flatnonzero(flat_lengths)
            feature_of_value = np.tile(np.arange(num_features), n)[bag_of_value]
        else:
            bag_of_value = np.repeat(np.arange(n * num_features), flat_lengths)
            feature_of_value = np.repeat(np.tile(np.arange(num_features), n), flat_lengths)
        sizes = self.sizes[feature_of_value]
        ranks = _bounded_zipf(uniforms, sizes, config.zipf_exponent, self.zipf_spans[feature_of_value])
        values = (ranks * self.multipliers[feature_of_value] + self.shifts[feature_of_value]) % sizes

        # Teacher rows follow the rank (the id is a scrambling of it).
        if self.capped:
            teacher_rows = self.row_base[feature_of_value] + ranks % self.rows[feature_of_value]
        else:  # (a rank is below its table's size: the modulo would be the rank)
            teacher_rows = self.row_base[feature_of_value] + ranks
        signal = _signal(ranks, config.signal_rows)
        return values, _bag_means(self.row_terms, teacher_rows, signal, bag_of_value, flat_lengths)


# Above this size of tables (a value, an effect and k latents per row of every feature) the teacher works id by id.
_RANK_TABLES_MAX_BYTES = 64 << 20


class _RankTables:
    """What the teacher computes for an id depends only on its feature and
    Zipf rank: its value and its bag term ``signal * row_terms[row]``. For
    tables small enough these are computed once for every (feature, rank),
    with the very operations ``_Teacher._values_and_means`` runs per id (so
    the same bits), and a batch of one-hot bags then needs one rank per bag
    and two gathers."""

    def __init__(self, feature_base: np.ndarray, values: np.ndarray, effects: np.ndarray, latents: np.ndarray) -> None:
        self.feature_base = feature_base  # [F] where each feature's ranks start
        self.values = values  # [rows] the id of each (feature, rank)
        # Its bag term, split: [rows + 1] and [rows + 1, k]; the last row, zeros, an empty bag's.
        self.effects, self.latents = effects, latents

    @classmethod
    def build(cls, teacher: "_Teacher") -> "_RankTables":
        sizes = teacher.sizes
        feature_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        feature = np.repeat(np.arange(len(sizes)), sizes)
        ranks = np.arange(int(sizes.sum()), dtype=np.int64) - feature_base[feature]
        values = (ranks * teacher.multipliers[feature] + teacher.shifts[feature]) % sizes[feature]
        rows = teacher.row_base[feature] + (ranks % teacher.rows[feature] if teacher.capped else ranks)
        terms = np.concatenate([teacher.row_terms.take(rows, axis=0), np.zeros((1, teacher.row_terms.shape[1]))])
        terms[:-1] *= _signal(ranks, teacher.config.signal_rows)[:, None]
        terms += 0.0  # as _bag_means: bincount's 0.0 + -0.0 is 0.0
        return cls(feature_base, values, np.ascontiguousarray(terms[:, 0]), np.ascontiguousarray(terms[:, 1:]))

    def one_hot(self, teacher: "_Teacher", lengths: np.ndarray, uniforms: np.ndarray, latents_out: np.ndarray):
        """``_values_and_means`` for bags of at most one id: the ranks of the
        whole ``[n, F]`` grid at once (an empty bag's uniform is a stand-in),
        then each bag's row of the tables. Returns the values and the bags'
        effects ``[n, F]``, and writes their latents to ``latents_out``
        ``[F, n, k]`` (feature-major)."""
        n, num_features = lengths.shape
        present = lengths.reshape(-1) > 0
        grid = np.zeros(n * num_features)
        grid[present] = uniforms
        ranks = _bounded_zipf(grid.reshape(n, num_features), teacher.sizes, teacher.config.zipf_exponent, teacher.zipf_spans)
        index = ranks + self.feature_base
        values = self.values.take(index.reshape(-1)[present])
        index.reshape(-1)[~present] = len(self.effects) - 1
        self.latents.take(index.T.reshape(-1), axis=0, out=latents_out.reshape(-1, latents_out.shape[-1]))
        return values, self.effects.take(index)


def _signal(ranks: np.ndarray, signal_rows: int) -> np.ndarray:
    """How much a row of rank ``ranks`` says: rare rows say less."""
    return 1.0 / (1.0 + ranks / signal_rows) if signal_rows > 0 else np.ones(ranks.size)


def _bag_means(row_terms: np.ndarray, rows: np.ndarray, signal: np.ndarray, bag_of_value: np.ndarray,
               lengths: np.ndarray) -> np.ndarray:
    """``[bags, columns]`` float64: the mean over each bag's ids of
    ``signal * row_terms[row]`` (0 for an empty bag), with the bits of
    ``np.bincount``'s in-order sums. With at most one id per bag (one-hot
    features, the main job's) the sum of one value is the value: one
    gather per bag gives the same bits at a fraction of the cost of one
    bincount per column (``row_terms``' last row is zeros: an empty bag's)."""
    bags = lengths.size
    if bags == 0 or lengths.max() <= 1:
        bag_rows = np.full(bags, row_terms.shape[0] - 1, dtype=np.int64)
        bag_rows[bag_of_value] = rows
        bag_signal = np.zeros(bags)
        bag_signal[bag_of_value] = signal
        means = row_terms.take(bag_rows, axis=0)
        means *= bag_signal[:, None]
        means += 0.0  # bincount's 0.0 + -0.0 is 0.0
        return means
    weighted = signal[:, None] * row_terms.take(rows, axis=0)
    denominator = np.maximum(lengths, 1)
    return np.stack([np.bincount(bag_of_value, weighted[:, j], bags) / denominator
                     for j in range(weighted.shape[1])], axis=1)  # fmt: skip


def _zipf_span(sizes: np.ndarray, exponent: float) -> np.ndarray:
    """What ``_bounded_zipf`` scales its uniforms by, per size: computed
    once per table, then gathered per id."""
    sizes = np.asarray(sizes).astype(np.float64)
    if exponent == 0.0:
        return sizes
    if abs(exponent - 1.0) < 1e-12:
        return np.log1p(sizes)
    return (sizes + 1.0) ** (1.0 - exponent) - 1.0


def _bounded_zipf(u: np.ndarray, sizes: np.ndarray, exponent: float, spans: Optional[np.ndarray] = None) -> np.ndarray:
    """0-based ranks in [0, size) with P(k) ~ 1/(k+1)^s, by inverting the
    continuous power law on [1, size + 1) (no per-row table). ``spans``:
    ``_zipf_span(sizes)``, when known."""
    spans = _zipf_span(sizes, exponent) if spans is None else spans
    if exponent == 0.0:
        x = 1.0 + u * spans
    elif abs(exponent - 1.0) < 1e-12:
        x = np.exp(u * spans)
    else:
        a = 1.0 - exponent
        x = (1.0 + u * spans) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, sizes.astype(np.int64) - 1)


def _coprime_near(n: int, target: float) -> int:
    if n <= 2:
        return 1
    m = max(int(target), 1)
    while math.gcd(m, n) != 1:
        m += 1
    return m


def _bias_for_rate(logits: np.ndarray, rate: float) -> float:
    """Bias b with mean(sigmoid(logits + b)) = rate, by bisection."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (1.0 / (1.0 + np.exp(-(logits + mid)))).mean() < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _slice(b: _Block, lo: int, hi: int) -> _Block:
    start, stop = b.sample_offsets[lo], b.sample_offsets[hi]
    return _Block(
        b.dense[lo:hi],
        b.lengths[lo:hi],
        b.values[start:stop],
        b.sample_offsets[lo : hi + 1] - start,
        b.labels[lo:hi],
        b.teacher_probability[lo:hi],
    )
