"""benchmarks/bench_train.py's correctness pass: dist_rec's DLRM with its
collection, the same model with TorchRec's fused collection, and TorchRec's
own DLRM around that collection must train alike from the same init (the
last only if the two models are one architecture, their interaction pairs
in the same order); and a broken peer must fail the pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_train  # noqa: E402

SPEC = dict(bench_train.resolve_preset("small", max_rows=5000), batch=64)


@pytest.fixture(scope="module")
def batches():
    return bench_train.make_batches(SPEC, 3)


def test_the_three_variants_train_alike(batches):
    result = bench_train.check_variants(SPEC, batches, 4, ["dist_rec", "torchrec", "torchrec_dlrm"])
    ours = result["losses"]["dist_rec"]
    assert len(ours) == 4 and all(map(torch.isfinite, torch.tensor(ours)))
    for variant in ("torchrec", "torchrec_dlrm"):
        assert result["losses"][variant] == pytest.approx(ours, abs=1e-5), variant
        assert result["weight_diff"][variant]["embedding"] < 1e-5, result["weight_diff"]
        assert result["weight_diff"][variant]["dense"] < 1e-4, result["weight_diff"]


def test_torchrec_dlrm_starts_from_dist_recs_mlp_weights(batches):
    ours, _, _ = bench_train.build("dist_rec", SPEC, batches[0]["keys"])
    theirs, _, _ = bench_train.build("torchrec_dlrm", SPEC, batches[0]["keys"])
    assert type(theirs).__module__ == "torchrec.models.dlrm"
    pairs = list(zip(bench_train.linear_layers(ours), bench_train.linear_layers(theirs), strict=True))
    assert len(pairs) == len(SPEC["bottom"]) + len(SPEC["top"])
    for mine, other in pairs:
        assert torch.equal(mine.weight, other.weight) and torch.equal(mine.bias, other.bias)
    # The same forward, part by part as the breakdown times it.
    dense, kjt_ours = batches[0]["dense"], bench_train.to_kjt("dist_rec", batches[0])
    kjt_theirs = bench_train.to_kjt("torchrec_dlrm", batches[0])
    with torch.no_grad():
        sparse_ours = bench_train.embedding_forward(ours, kjt_ours)
        sparse_theirs = bench_train.embedding_forward(theirs, kjt_theirs)
        torch.testing.assert_close(sparse_ours, sparse_theirs)
        torch.testing.assert_close(bench_train.dense_forward(ours, dense, sparse_ours),
                                   bench_train.dense_forward(theirs, dense, sparse_theirs))  # fmt: skip
        torch.testing.assert_close(bench_train.dense_forward(ours, dense, sparse_ours), ours(dense, kjt_ours))


def test_a_peer_that_trains_differently_fails_the_pass(batches, tmp_path, monkeypatch):
    data = tmp_path / "batches.pt"
    torch.save(batches, data)
    args = bench_train.build_parser().parse_args(["--variants", "dist_rec", "torchrec_dlrm", "--check-steps", "3"])
    real_build = bench_train.build

    def build_with_a_negated_layer(variant, spec, keys):
        model, optimizer, ebc = real_build(variant, spec, keys)
        if variant == "torchrec_dlrm":
            with torch.no_grad():
                bench_train.linear_layers(model)[0].weight.mul_(-1.0)
        return model, optimizer, ebc

    monkeypatch.setattr(bench_train, "build", build_with_a_negated_layer)
    monkeypatch.setattr(bench_train, "run_worker", lambda name, spec, data, args, steps=None: bench_train.check_variants(
        spec, torch.load(data), steps, args.variants))  # fmt: skip
    with pytest.raises(SystemExit, match="CORRECTNESS CHECK FAILED for small: dist_rec and torchrec_dlrm"):
        bench_train.check(SPEC, data, args)
