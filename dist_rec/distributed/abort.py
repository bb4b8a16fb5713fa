"""Leaving every collective at once: the process-level abort recovery needs.

A gloo collective blocked on a peer returns only when that peer's socket
closes or the group's timeout passes. A rank that died closes its sockets
(the kernel does it), but a survivor that has already seen the failure
does not: ``destroy_process_group`` and ``ProcessGroupGloo.abort`` leave
the connections open while anything holds the group (measured: a peer
blocked on such a survivor waits out the whole timeout). So the survivors
would notice one by one, each after the timeout.

``abort_communication`` shuts down (``shutdown(SHUT_RDWR)``, not close:
the descriptors stay gloo's) every established TCP connection of this
process except those to the rendezvous stores, and aborts the intra-host
shared-memory transports. Every collective of this process then fails at
once, and so does every peer's collective that waits on this process: one
survivor's failure reaches all the others within milliseconds (a cascade),
and a survivor can be woken from a blocked collective by another thread
(the fault monitor, when the coordinator aborts the membership epoch).
The groups are unusable afterwards: the caller re-forms them.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable, Set

from dist_rec.distributed import shm_transport

_ESTABLISHED = "01"


def _socket_inodes() -> dict:
    inodes = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[target[8:-1]] = int(fd)
    return inodes


def abort_communication(reason: str, keep_ports: Iterable[int] = ()) -> int:
    """Fails every collective of this process now (see the module
    docstring); connections whose local or remote port is in
    ``keep_ports`` (the stores') stay. Returns how many connections were
    shut down. Linux only (reads ``/proc/self/net``); elsewhere only the
    shared-memory transports are aborted."""
    shm_transport.abort_all(reason)
    keep: Set[int] = {int(p) for p in keep_ports if p}
    inodes = _socket_inodes()
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED or fields[9] not in inodes:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port in keep or remote_port in keep:
                continue
            try:
                connection = socket.socket(fileno=os.dup(inodes[fields[9]]))  # closing it closes the duplicate only
            except OSError:
                continue
            try:
                connection.shutdown(socket.SHUT_RDWR)
                count += 1
            except OSError:
                pass
            finally:
                connection.close()
    return count


def store_port(store) -> int:
    """The TCP port of ``store`` (under any prefixes), or 0 when it is not
    a TCP store."""
    while store is not None:
        port = getattr(store, "port", None)
        if port:
            return int(port)
        store = getattr(store, "underlying_store", None)
    return 0
