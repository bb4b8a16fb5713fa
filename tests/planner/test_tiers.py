"""The tier model: per-row costs, JSON round trips, and a calibration of a
second or so that must find plausible rates and leave no file behind."""

import json
import os
import re

import pytest

from dist_rec.placement import EmbeddingLocation
from dist_rec.planner.tiers import Tier, TierModel, measure_ssd_random_reads

GB = 1e9


def model():
    return TierModel(
        [
            Tier("device", 1 << 30, 10 * GB),
            Tier("host", 8 << 30, 5 * GB),
            Tier("ssd", 100 << 30, 20_000 * 4096.0, read_granularity_bytes=4096, details={"iops_qd1": 4000.0}),
        ]
    )


def test_row_cost_rounds_reads_up_to_the_tier_granularity():
    m = model()
    assert m.tier("device").seconds_per_row(256) == pytest.approx(256 / (10 * GB))
    assert m.tier("device").seconds_per_row(100) == pytest.approx(128 / (10 * GB))  # two cache lines
    ssd = m.tier(EmbeddingLocation.SSD)
    assert ssd.rows_per_s(256) == pytest.approx(20_000)  # one 4 KiB block per row: IOPS-bound
    assert ssd.rows_per_s(4096) == pytest.approx(20_000)
    assert ssd.rows_per_s(5000) == pytest.approx(10_000)
    assert ssd.location == EmbeddingLocation.SSD


def test_json_round_trip_and_capacities(tmp_path):
    m = model()
    m.save(tmp_path / "tiers.json")
    back = TierModel.load(tmp_path / "tiers.json")
    assert back.to_dict() == m.to_dict()
    assert back.names == ["device", "host", "ssd"]
    smaller = m.with_capacities(device=123, ssd=456)
    assert [t.capacity_bytes for t in smaller.tiers] == [123, 8 << 30, 456]
    assert m.tier("device").capacity_bytes == 1 << 30  # the original is unchanged
    assert "ssd    | 100.0 GiB" in str(m)


def test_invalid_tiers_are_named():
    with pytest.raises(ValueError, match=re.escape("Invalid location='nvme' for a tier. Must be one of device, host, ssd.")):
        Tier("nvme", 1, 1.0)
    with pytest.raises(ValueError, match=re.escape("Invalid row_read_bytes_per_s=0 for tier 'ssd'. Must be > 0.")):
        Tier("ssd", 1, 0)
    with pytest.raises(ValueError, match=re.escape("Invalid tier 'ssd'. This tier model has ['device', 'host'].")):
        TierModel([Tier("device", 1, 1.0), Tier("host", 1, 1.0)]).tier("ssd")
    with pytest.raises(ValueError, match=re.escape("Invalid tiers ['host', 'host']")):
        TierModel([Tier("host", 1, 1.0), Tier("host", 1, 1.0)])
    with pytest.raises(ValueError, match=re.escape("Not a tier model: KeyError 'tiers'.")):
        TierModel.from_dict({})


def test_a_short_calibration_finds_positive_rates_and_removes_its_file(tmp_path):
    m = TierModel.calibrate(tmp_path, row_bytes=256, seconds=0.6, file_bytes=8 << 20, ssd_threads=4)
    assert os.listdir(tmp_path) == []  # the temporary file is gone
    assert m.names == ["device", "host", "ssd"]
    dram, ssd = m.tier("host"), m.tier("ssd")
    # Loose bounds: the CPU may be shared, but a random row from DRAM is
    # never slower than 1 MB/s, nor faster than 10 TB/s.
    assert 1e6 < dram.row_read_bytes_per_s < 1e13
    assert ssd.details["iops_qd1"] > 10 and ssd.details["iops_qd4"] > 10
    assert ssd.row_read_bytes_per_s == pytest.approx(ssd.details["iops_qd4"] * 4096)
    assert ssd.read_granularity_bytes == 4096 and ssd.capacity_bytes > 0
    assert json.loads(json.dumps(m.to_dict())) == m.to_dict()


def test_load_or_calibrate_reuses_a_saved_model(tmp_path, monkeypatch):
    path = tmp_path / "tiers.json"
    model().save(path)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although a saved model exists")

    monkeypatch.setattr(TierModel, "calibrate", classmethod(no_calibration))
    assert TierModel.load_or_calibrate(path).to_dict() == model().to_dict()


def test_ssd_reads_need_aligned_sizes(tmp_path):
    with pytest.raises(ValueError, match=re.escape("Invalid read_bytes=1000. Must be a multiple of 4096 for O_DIRECT.")):
        measure_ssd_random_reads(tmp_path, 1000, 0.1)
