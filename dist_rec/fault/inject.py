"""Failures on purpose: the injector tests and benchmarks use.

A failure is described by a line of ``key=value`` words (``fault.inject``
in the config, one string per failure)::

    rank=1 step=300                      SIGKILL rank 1 right after its step 300
    rank=2 step=1500 signal=stop         SIGSTOP it instead (a hung process)
    rank=0 step=400 at=checkpoint        SIGKILL it while it writes the checkpoint of step 400
    rank=1 at=restore incarnation=1      SIGKILL rank 1's first replacement during its own recovery

``incarnation`` (default 0) says which process of the rank acts: a
replacement does not repeat its predecessor's failure. The launcher-side
chaos script (``chaos.py``) kills or stops random ranks from outside.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
PLACES = ("step", "checkpoint", "restore")


@dataclass(frozen=True)
class FailureSpec:
    rank: int
    step: int = 0
    signal: str = "kill"
    at: str = "step"
    incarnation: int = 0

    @classmethod
    def parse(cls, text: str) -> "FailureSpec":
        fields = {}
        for word in text.replace(",", " ").split():
            name, sep, value = word.partition("=")
            if not sep or name not in ("rank", "step", "signal", "at", "incarnation"):
                raise ValueError(
                    f"Invalid failure {text!r}: {word!r}. Must be key=value words with keys rank, step, signal "
                    "(kill | stop), at (step | checkpoint | restore), incarnation; e.g. 'rank=1 step=300'."
                )
            fields[name] = value
        if "rank" not in fields:
            raise ValueError(f"Invalid failure {text!r}. Must name the rank, e.g. 'rank=1 step=300'.")
        try:
            spec = cls(int(fields["rank"]), int(fields.get("step", 0)), fields.get("signal", "kill"),
                       fields.get("at", "step"), int(fields.get("incarnation", 0)))  # fmt: skip
        except ValueError:
            raise ValueError(f"Invalid failure {text!r}. rank, step and incarnation must be integers.") from None
        if spec.signal not in SIGNALS:
            raise ValueError(f"Invalid failure {text!r}. signal must be one of {sorted(SIGNALS)}.")
        if spec.at not in PLACES:
            raise ValueError(f"Invalid failure {text!r}. at must be one of {list(PLACES)}.")
        if spec.rank < 0 or spec.step < 0 or spec.incarnation < 0:
            raise ValueError(f"Invalid failure {text!r}. rank, step and incarnation must be >= 0.")
        return spec


class FailureInjector:
    """Acts out the failures meant for this process (``rank`` and
    ``incarnation``) at their moments; ``note(event)`` records each one in
    the fault event log before the signal (the benchmark's clock)."""

    def __init__(self, specs: Sequence[str], rank: int, incarnation: int, note=lambda **fields: None) -> None:
        self.specs: List[FailureSpec] = [
            s for s in map(FailureSpec.parse, specs) if s.rank == rank and s.incarnation == incarnation
        ]
        self.note = note

    def __bool__(self) -> bool:
        return bool(self.specs)

    def at(self, place: str, step: int) -> None:
        """Called at every ``place`` ("step" after each step, "checkpoint"
        while a save of ``step`` writes, "restore" during a recovery)."""
        for spec in self.specs:
            if spec.at == place and (place == "restore" or spec.step == step):
                self._strike(spec, step)

    def _strike(self, spec: FailureSpec, step: int) -> None:
        self.note(signal=spec.signal, at=spec.at, step=step)
        os.kill(os.getpid(), SIGNALS[spec.signal])
        time.sleep(0.5)  # SIGKILL takes effect at once; SIGSTOP stops us here


def parse_all(specs: Sequence[str]) -> Optional[str]:
    """The first invalid failure's message, or None."""
    for text in specs:
        try:
            FailureSpec.parse(text)
        except ValueError as error:
            return str(error)
    return None
