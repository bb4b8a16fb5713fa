"""Failure specs: what ``fault.inject`` accepts and how it refuses the rest."""

import pytest

from dist_rec.config import ConfigError, load_config
from dist_rec.fault.inject import FailureInjector, FailureSpec


def test_specs_parse_with_defaults():
    assert FailureSpec.parse("rank=1 step=300") == FailureSpec(1, 300, "kill", "step", 0)
    assert FailureSpec.parse("rank=2, step=5, signal=stop") == FailureSpec(2, 5, "stop", "step", 0)
    assert FailureSpec.parse("rank=1 at=restore incarnation=1") == FailureSpec(1, 0, "kill", "restore", 1)


@pytest.mark.parametrize("text,message", [
    ("step=3", "Must name the rank"),
    ("rank=1 stp=3", "'stp=3'"),
    ("rank=one", "must be integers"),
    ("rank=1 signal=term", "signal must be one of"),
    ("rank=1 at=lunch", "at must be one of"),
    ("rank=-1", ">= 0"),
])  # fmt: skip
def test_bad_specs_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        FailureSpec.parse(text)


def test_the_config_refuses_a_bad_spec_naming_the_field():
    with pytest.raises(ConfigError, match=r"Invalid fault.inject entry 'rank=1 stp=3'"):
        load_config("launch/configs/tiny.yaml", ['fault.inject=["rank=1 stp=3"]'])
    with pytest.raises(ConfigError, match=r"fault.heartbeat_s"):
        load_config("launch/configs/tiny.yaml", ["fault.timeout_s=3", "fault.heartbeat_s=2"])


def test_an_injector_keeps_only_this_processs_failures():
    injector = FailureInjector(["rank=1 step=3", "rank=1 step=4 incarnation=1", "rank=0 step=3"], rank=1, incarnation=0)
    assert [s.step for s in injector.specs] == [3]
    assert not FailureInjector(["rank=0 step=3"], rank=1, incarnation=0)
