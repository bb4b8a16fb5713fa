"""What the training thread is doing, for the watchdog to tell.

The trainer marks each phase of its loop (``ACTIVITY.set("step 812:
forward and backward")``), the collectives mark what they start
(``ACTIVITY.note("output all-to-all")``): two attribute stores, cheap
enough for every step. The watchdog thread (``member.Watchdog``) reads
them: a phase that has not changed for a while is a wait, and it logs what
the rank is waiting for and since when.
"""

from __future__ import annotations

import time


class Activity:
    """The training thread's current phase, when it began, and the last
    collective it started."""

    __slots__ = ("what", "since", "started_at", "detail")

    def __init__(self) -> None:
        self.set("starting")

    def set(self, what: str) -> None:
        self.what = what
        self.since = time.monotonic()
        self.started_at = time.time()
        self.detail = ""

    def note(self, detail: str) -> None:
        self.detail = detail

    def describe(self) -> str:
        return self.what + (f" (last collective started: {self.detail})" if self.detail else "")


ACTIVITY = Activity()
