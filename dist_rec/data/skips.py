"""Counting the lines a reader skips, and refusing a stream that is mostly
skipped.

A skipped line must never pass unnoticed: each is counted by reason, the
first few are kept with their ``file:line`` and fault, and the trainer
reports the counts. Past ``max_skip_fraction`` of the lines read, or with
no usable sample at all, the reader raises with the counts instead of
training on what is left.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List

# A fraction is judged only after this many lines (or at the end): a few
# bad lines at the head of a file are not yet "more than 1%".
MIN_LINES_JUDGED = 10_000
EXAMPLES_KEPT = 10


class SkipCounter:
    """Lines read and skipped in one pass of a reader."""

    def __init__(self, max_skip_fraction: float, what: str) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"Invalid max_skip_fraction={max_skip_fraction!r}. Must be in [0, 1].")
        self.max_skip_fraction = max_skip_fraction
        self.what = what  # e.g. "train.tsv, test.tsv": named in the errors
        self.lines_read = 0
        self.skipped = 0
        self.by_reason: Dict[str, int] = Counter()
        self.examples: List[str] = []

    def add(self, lines: int, reasons: List[str], messages: List[str]) -> None:
        """A chunk of ``lines`` lines of which these were skipped (one
        reason each; ``messages`` the first few, ``file:line: fault``)."""
        self.lines_read += lines
        self.skipped += len(reasons)
        self.by_reason.update(reasons)
        self.examples.extend(messages[: max(0, EXAMPLES_KEPT - len(self.examples))])
        if self.lines_read >= MIN_LINES_JUDGED:
            self.check()

    def check(self) -> None:
        if self.skipped > self.max_skip_fraction * self.lines_read:
            raise ValueError(
                f"{self.describe()}: more than data.max_skip_fraction={self.max_skip_fraction:g} of the lines read. "
                "Fix the data or the schema, or raise data.max_skip_fraction."
            )

    def finish(self) -> None:
        """At the end of the stream: the fraction, and at least one sample."""
        if self.lines_read and self.skipped == self.lines_read:
            raise ValueError(f"No usable sample: {self.describe()}.")
        self.check()

    def describe(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.by_reason.items()))
        text = f"{self.skipped} of {self.lines_read} lines skipped in {self.what}"
        if self.skipped:
            text += f" ({reasons}); first: {self.examples[0]}"
        return text

    def summary(self) -> Dict:
        return {"lines_read": self.lines_read, "skipped": self.skipped, "by_reason": dict(self.by_reason),
                "examples": list(self.examples)}  # fmt: skip


class SkipCounts:
    """The skip counts of a reader's latest pass (its ``skips``) under the
    names the trainer and the converters read."""

    skips: SkipCounter

    @property
    def skipped_lines(self) -> int:
        return self.skips.skipped

    @property
    def skipped_by_reason(self) -> Dict[str, int]:
        return dict(self.skips.by_reason)

    @property
    def skipped_examples(self) -> List[str]:
        return list(self.skips.examples)

