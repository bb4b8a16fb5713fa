"""How often to checkpoint, chosen from the failure rate and the save cost.

With full recovery every rank goes back to the last checkpoint at a
failure: the work since it (half an interval on average) is lost for the
whole job, against the cost of saving more often. Young's first-order
optimum (Daly's refinement agrees to first order):

    T = sqrt(2 * save_cost * MTBF)

With partial recovery (CPR) the survivors lose nothing; only the lost
shard's updates since its checkpoint are lost, measured as the portion of
lost samples:

    PLS ~= N_fail * (T / 2) / (T_total * N_emb),   N_fail ~= T_total / MTBF
        =  T / (2 * MTBF * N_emb)

so the largest interval whose expected PLS stays under a target PLS* is

    T = 2 * PLS* * MTBF * N_emb

(N_emb: the embedding shards, here the ranks of a sharding group).

With background saves the save cost is the training thread's stall (the
snapshot), and the interval is never shorter than a background write: at
most one save is in flight, so a shorter one would stall for the write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict


def young_daly(save_cost_s: float, mtbf_s: float) -> float:
    """Seconds between saves that minimise save cost plus lost work under full recovery."""
    if save_cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"Invalid save_cost_s={save_cost_s}, mtbf_s={mtbf_s}. Must be >= 0 and > 0.")
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def partial_recovery_interval(target_pls: float, mtbf_s: float, num_shards: int) -> float:
    """The largest seconds between saves whose expected PLS is at most ``target_pls``."""
    if not 0 < target_pls < 1 or mtbf_s <= 0 or num_shards < 1:
        raise ValueError(f"Invalid target_pls={target_pls}, mtbf_s={mtbf_s}, num_shards={num_shards}.")
    return 2.0 * target_pls * mtbf_s * num_shards


def expected_pls(interval_s: float, mtbf_s: float, num_shards: int) -> float:
    return interval_s / (2.0 * mtbf_s * num_shards)


def full_recovery_overhead(interval_s: float, save_cost_s: float, mtbf_s: float, restart_s: float = 0.0) -> float:
    """Expected share of time lost to saves, redone work and restarts."""
    return save_cost_s / interval_s + (interval_s / 2.0 + restart_s) / mtbf_s


@dataclass
class IntervalChoice:
    seconds: float
    steps: int
    rule: str  # "young-daly" | "partial-recovery"
    figures: Dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        f = self.figures
        text = (
            f"checkpoint interval {self.steps} steps ({self.seconds:.0f} s) by the {self.rule} rule: MTBF {f['mtbf_s']:.0f} s, "
            f"save cost {f['save_cost_s']:.3f} s, step {f['step_s'] * 1000:.1f} ms"
        )
        if self.rule.startswith("partial-recovery"):
            text += (
                f", target PLS {f['target_pls']:g} over {int(f['num_shards'])} shards (expected PLS {f['expected_pls']:.2e}); "
                f"full recovery would save every {f['young_daly_s']:.0f} s"
            )
        else:
            text += f" (expected overhead {f['expected_overhead']:.2%})"
        return text


def choose_interval(
    save_cost_s: float,
    mtbf_s: float,
    step_s: float,
    partial: bool,
    target_pls: float = 0.01,
    num_shards: int = 1,
    min_steps: int = 1,
    write_s: float = 0.0,
) -> IntervalChoice:
    """The interval for a run: partial recovery's rule when the job recovers
    partially (under ``dist_rec.fault.launch``), Young/Daly's otherwise; at
    least one background write (``write_s``); in steps of ``step_s`` seconds
    (at least ``min_steps``)."""
    young = young_daly(save_cost_s, mtbf_s)
    figures = dict(mtbf_s=mtbf_s, save_cost_s=save_cost_s, step_s=step_s, young_daly_s=young,
                   target_pls=target_pls, num_shards=num_shards, write_s=write_s)  # fmt: skip
    if partial:
        seconds = partial_recovery_interval(target_pls, mtbf_s, num_shards)
        rule = "partial-recovery"
    else:
        seconds = young
        rule = "young-daly"
    if write_s > seconds:
        seconds, rule = write_s, rule + " (raised to one background write)"
    figures["expected_pls"] = expected_pls(seconds, mtbf_s, num_shards)
    figures["expected_overhead"] = full_recovery_overhead(seconds, save_cost_s, mtbf_s) if seconds > 0 else float("inf")
    steps = max(int(min_steps), int(seconds / max(step_s, 1e-9)))
    return IntervalChoice(seconds, steps, rule, figures)
