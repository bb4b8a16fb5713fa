"""Failures from outside, on a schedule: ``python -m dist_rec.fault.chaos``.

Beside a job started by ``dist_rec.fault.launch``, it kills (SIGKILL) or
stops (SIGSTOP: a hung process) a random rank every ``--every`` seconds,
finding the workers' pids in their heartbeats in the job's store; or it
takes a network-namespace host's link down for ``--down-for`` seconds
(``--netns``: a host made by ``dist_rec.fault.netns`` or by hand). Its loop
is bounded in count and in time, and it touches only the job's own
processes and the namespaces it is given::

    python -m dist_rec.fault.chaos --store 127.0.0.1:29400 --every 60 --count 3 --signal kill
    python -m dist_rec.fault.chaos --netns drh1a2b3c1 --every 90 --down-for 20 --count 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import List, Optional

from dist_rec.fault import store as ft


def _say(message: str) -> None:
    print(f"[dist_rec.fault.chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _workers(store) -> List[dict]:
    """The running epoch's ranks with their pids (from their heartbeats)."""
    latest = int(store.get("ft/epoch/latest") or b"-1")
    if latest < 0:
        return []
    members = json.loads(store.get(f"ft/epoch/{latest}"))["members"]
    beats = ft.get_all(store, "hb", max(members) + 1)
    return [dict(rank=r, **beats[r]) for r in members if beats[r] and beats[r].get("state") == "training"]


def strike(store, sig: str, rng: random.Random, ranks: Optional[List[int]] = None) -> Optional[dict]:
    """Sends ``sig`` to one random training rank; returns it, or None."""
    candidates = [w for w in _workers(store) if ranks is None or w["rank"] in ranks]
    if not candidates:
        return None
    victim = rng.choice(candidates)
    os.kill(int(victim["pid"]), signal.SIGKILL if sig == "kill" else signal.SIGSTOP)
    return victim


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--store", help="host:port of the job's store (kill or stop ranks)")
    target.add_argument("--netns", help="a network namespace whose eth0 goes down and up")
    parser.add_argument("--signal", choices=["kill", "stop"], default="kill")
    parser.add_argument("--ranks", type=int, nargs="+", help="only these ranks (default: any)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between failures")
    parser.add_argument("--count", type=int, default=1, help="failures at most")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds at most")
    parser.add_argument("--down-for", type=float, default=20.0, help="seconds a link stays down (--netns)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.count < 1 or args.every <= 0 or args.duration <= 0:
        parser.error("--count, --every and --duration must be positive")
    rng = random.Random(args.seed)
    store = ft.ReconnectingStore(args.store) if args.store else None
    deadline, done = time.monotonic() + args.duration, 0
    while done < args.count and time.monotonic() + args.every < deadline:
        time.sleep(args.every)
        if store is not None:
            try:
                victim = strike(store, args.signal, rng, args.ranks)
            except Exception as error:  # the job ended, or its store is down
                _say(f"cannot reach the job: {error}")
                return 1
            if victim is None:
                _say("no rank is training; waiting")
                continue
            _say(f"SIG{args.signal.upper()} to rank {victim['rank']} (pid {victim['pid']}, step {victim.get('step')})")
        else:
            _say(f"{args.netns}: link down for {args.down_for:.0f} s")
            subprocess.run(["ip", "-n", args.netns, "link", "set", "eth0", "down"], check=True)
            time.sleep(args.down_for)
            subprocess.run(["ip", "-n", args.netns, "link", "set", "eth0", "up"], check=True)
            _say(f"{args.netns}: link up")
        done += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
