"""Hosts in network namespaces: real links between processes of one machine.

Tests and benchmarks of what crosses a network (recovery when a host is cut
off, multi-node launch, background sync over a slow link) need several
"hosts" with links that can go down or be rate limited. ``Hosts`` makes
them with iproute2 (root required): one namespace per host, each with an
``eth0`` (``10.<subnet>.0.<i + 1>/24``) wired by a veth pair to a bridge in
a switch namespace, and its own loopback. ``run``/``popen`` start a
command inside a host (``ip netns exec``); ``cut``/``restore`` take a
host's link down and up; ``shape`` puts a token bucket (rate) and a delay
on it. All traffic stays inside the namespaces; ``close`` (or leaving the
``with`` block) deletes them.

    with Hosts(2) as hosts:
        store = f"{hosts.address(0)}:29400"
        a = hosts.popen(0, [python, "-m", "dist_rec.fault.launch", "--store", store, ...])
        hosts.cut(1); ...; hosts.restore(1)
"""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import List, Optional, Sequence


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``count`` hosts in network namespaces on one bridge (see the module docstring).

    Args:
        count (int): hosts.
        subnet (Optional[int]): the second octet of their addresses
            (10.<subnet>.0.0/24); random when None.
    """

    def __init__(self, count: int, subnet: Optional[int] = None) -> None:
        if os.geteuid() != 0:
            raise PermissionError("dist_rec.fault.netns.Hosts needs root (network namespaces, veth, tc).")
        self.count = int(count)
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = subnet if subnet is not None else 100 + int(self.tag[:2], 16) % 100
        self.switch = f"drsw{self.tag}"
        self.names: List[str] = [f"drh{self.tag}{i}" for i in range(self.count)]
        self._made: List[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            self._made.append(name)
            port = f"p{self.tag}{i}"
            _ip("link", "add", port, "type", "veth", "peer", "name", f"e{self.tag}{i}")
            _ip("link", "set", port, "netns", self.switch)
            _ip("link", "set", f"e{self.tag}{i}", "netns", name)
            _ip("-n", name, "link", "set", f"e{self.tag}{i}", "name", "eth0")
            _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")

    def address(self, host: int) -> str:
        return f"10.{self.subnet}.0.{host + 1}"

    def prefix(self, host: int) -> List[str]:
        """The command prefix that runs a program inside ``host``."""
        return ["ip", "netns", "exec", self.names[host]]

    def env(self, extra: Optional[dict] = None) -> dict:
        """The environment for a process in a host: gloo on its eth0."""
        env = dict(os.environ)
        env["GLOO_SOCKET_IFNAME"] = "eth0"
        env.update(extra or {})
        return env

    def popen(self, host: int, command: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(host), *command], **kwargs)

    def run(self, host: int, command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(host), *command], **kwargs)

    def cut(self, host: int) -> None:
        """Takes ``host``'s link down: nothing reaches it, nothing leaves it."""
        _ip("-n", self.names[host], "link", "set", "eth0", "down")

    def restore(self, host: int) -> None:
        _ip("-n", self.names[host], "link", "set", "eth0", "up")

    def shape(self, host: int, rate: str = "1gbit", delay_ms: float = 0.0, burst: str = "256kb") -> None:
        """Limits ``host``'s outgoing traffic to ``rate`` (a token bucket)
        after ``delay_ms`` of latency; both directions when every host is shaped."""
        name = self.names[host]
        subprocess.run(["tc", "-n", name, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        if delay_ms:
            subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay",
                            f"{delay_ms}ms"], check=True, capture_output=True)  # fmt: skip
            parent = ["parent", "1:1", "handle", "10:"]
        else:
            parent = ["root"]
        subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "eth0", *parent, "tbf", "rate", rate, "burst", burst,
                        "latency", "100ms"], check=True, capture_output=True)  # fmt: skip

    def close(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made = []

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
