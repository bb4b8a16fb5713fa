"""What a failed collective looks like, whatever carried it.

Gloo reports a dead peer as ``RuntimeError`` ("Connection reset by peer",
"Connection closed by peer"), a hung or unreachable one as ``RuntimeError``
("Timed out waiting ..."), torch's store and rendezvous as ``DistError``;
the shared-memory all-to-all raises ``CollectiveFailure``. Recovery must
tell these from a genuine error of the program (bad input, a bug), which
it must not paper over: ``is_collective_failure`` is that test.
"""

from __future__ import annotations

import re

import torch.distributed as dist


class CollectiveFailure(RuntimeError):
    """A collective could not complete: a peer exited, hung past the
    timeout or was cut off, or this process aborted its communication."""


# Messages of gloo's transport (and c10d's socket layer) for a peer that
# is gone, silent or unreachable.
_TRANSPORT_MESSAGES = re.compile(
    r"gloo/transport|Connection (reset|closed|refused)|Broken pipe|Timed out waiting|Socket Timeout|"
    r"timed out|timeout caused pair closure|No route to host|Network is unreachable|Connection timed out|"
    r"ProcessGroupGloo|DistNetworkError|Transport endpoint",
    re.IGNORECASE,
)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failed collective rather
    than an error of the program itself."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (CollectiveFailure, dist.DistError)):
            return True
        if isinstance(error, RuntimeError) and _TRANSPORT_MESSAGES.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False
