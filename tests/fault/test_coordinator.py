"""The coordinator's decisions, driven through a real store with the
records workers and launchers write (no worker processes)."""

import json

from dist_rec.fault import store as ft
from dist_rec.fault.coordinator import AWAITING, FAILED, FINISHED, RUNNING, Coordinator
from launching import free_port


class World:
    """A store, a coordinator, and helpers that write what workers would."""

    def __init__(self, world_size: int, replicas: int = 1, timeout_s: float = 5.0, **kwargs) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.server = ft.connect(self.address, is_master=True)
        self.store = ft.ReconnectingStore(self.address)
        ft.initialise(self.store, world_size)
        self.replicas, self.world_size = replicas, world_size
        self.coordinator = Coordinator(self.store, world_size, timeout_s=timeout_s, log=lambda m: None, **kwargs)
        self.now = 0.0
        self.beats = {}

    def join(self, rank, incarnation=0, state="fresh", after=-1):
        ft.set_json(self.store, ft.key("join", rank), {"incarnation": incarnation, "state": state, "step": 0,
                    "after": after, "replicas": self.replicas, "layout": "shards_on_host"})  # fmt: skip

    def beat(self, rank, incarnation=0):
        self.beats[rank] = self.beats.get(rank, 0) + 1
        ft.set_json(self.store, ft.key("hb", rank), {"incarnation": incarnation, "count": self.beats[rank]})

    def exit(self, rank, incarnation=0, code=-9):
        ft.set_json(self.store, ft.key("exit", rank), {"incarnation": incarnation, "code": code, "how": "SIGKILL"})

    def arrive(self, epoch_id, count):
        self.store.add(f"ft/epoch/{epoch_id}/arrived", count)

    def tick(self, seconds=0.1):
        self.now += seconds
        self.coordinator.tick(self.now)

    def epoch(self, epoch_id):
        return json.loads(self.store.get(f"ft/epoch/{epoch_id}"))

    def aborted(self, epoch_id):
        return self.store.check([f"ft/abort/{epoch_id}"])


def _replace_rank_1(w: World):
    """Rank 1 dies; rank 0 asks to go on, rank 1's first replacement joins fresh and beats."""
    w.exit(1)
    w.tick()
    w.join(0, 0, "intact", after=0)
    w.join(1, 1, "fresh")
    w.beat(1, 1)
    w.tick()


def _start(w: World):
    for r in range(w.world_size):
        w.join(r)
        w.beat(r)
    w.tick()
    assert w.epoch(0)["members"] == list(range(w.world_size))
    w.arrive(0, w.world_size)
    w.tick()
    assert w.coordinator.running.id == 0


def test_1d_failure_waits_for_the_replacement_and_names_roles():
    w = World(2)
    _start(w)
    w.exit(1)
    w.tick()
    assert w.aborted(0) and w.coordinator.phase == AWAITING
    assert json.loads(w.store.get(ft.key("fence", 1))) == {"incarnation": 0}
    w.join(0, 0, "intact", after=0)
    w.tick()
    assert not w.store.check(["ft/epoch/1"])  # the replacement has not joined yet
    w.join(1, 1, "fresh")
    w.beat(1, 1)
    w.tick()
    epoch = w.epoch(1)
    assert epoch["roles"] == {"0": "survivor", "1": "replacement"} and epoch["incarnations"] == {"0": 0, "1": 1}


def test_2d_failure_lets_the_whole_group_go_on_then_takes_the_others_back():
    w = World(4, replicas=2)
    _start(w)
    w.exit(2)
    w.tick()
    degraded = w.epoch(1)
    assert degraded["members"] == [0, 1] and degraded["replicas"] == 1
    w.arrive(1, 2)
    w.tick()
    assert w.coordinator.running.id == 1
    w.join(3, 0, "intact", after=0)
    w.tick()
    assert not w.store.check(["ft/epoch/2"])  # rank 2's replacement is not ready
    w.join(2, 1, "fresh")
    w.beat(2, 1)
    w.tick()
    back = w.epoch(2)
    assert back["roles"] == {"0": "survivor", "1": "survivor", "2": "replacement", "3": "rejoiner"}
    assert w.store.get("ft/pending") == b"2"  # the running ranks switch at a step boundary
    assert not w.aborted(1)


def test_a_silent_heartbeat_means_a_dead_rank_after_the_timeout():
    w = World(2, timeout_s=5.0)
    _start(w)
    for _ in range(40):  # 4 s: rank 0 beats, rank 1 is silent
        w.beat(0)
        w.tick(0.1)
    assert not w.aborted(0)
    for _ in range(15):
        w.beat(0)
        w.tick(0.1)
    assert w.aborted(0) and 1 in w.coordinator.history[0]["dead"]


def test_a_replacement_dying_before_its_epoch_forms_is_replaced_again():
    w = World(2)
    _start(w)
    _replace_rank_1(w)
    assert w.epoch(1)["incarnations"]["1"] == 1
    w.exit(1, incarnation=1)
    w.tick()
    assert w.aborted(1) and w.coordinator.phase == AWAITING
    w.join(1, 2, "fresh")
    w.beat(1, 2)
    w.tick()
    assert w.epoch(2)["incarnations"] == {"0": 0, "1": 2}


def test_the_job_finishes_when_the_running_ranks_are_done():
    w = World(4, replicas=2)
    _start(w)
    w.exit(2)
    w.tick()
    w.arrive(1, 2)
    w.tick()
    w.exit(0, code=0)
    w.exit(1, code=0)
    w.tick()
    assert w.coordinator.phase == FINISHED and w.store.check(["ft/finished"])


def test_it_gives_up_after_max_failures_or_a_join_timeout():
    w = World(2, max_failures=1)
    _start(w)
    _replace_rank_1(w)
    w.arrive(1, 2)
    w.tick()
    w.exit(0)
    w.tick()
    assert w.coordinator.phase == FAILED and b"max_failures" in w.store.get("ft/failed")

    w = World(2, join_timeout_s=3.0)
    _start(w)
    w.exit(1)
    w.tick()
    w.tick(4.0)
    assert w.coordinator.phase == FAILED and b"did not join" in w.store.get("ft/failed")


def test_ranks_must_agree_on_the_grid():
    w = World(2)
    w.join(0)
    ft.set_json(w.store, ft.key("join", 1), {"incarnation": 0, "state": "fresh", "replicas": 2, "layout": "shards_on_host"})
    w.tick()
    assert w.coordinator.phase == FAILED and b"disagree" in w.store.get("ft/failed")


def test_join_records_are_spent_when_their_epoch_forms_but_newer_ones_stay():
    w = World(2)
    _start(w)
    assert w.store.get(ft.key("join", 0)) == ft.EMPTY and w.coordinator.phase == RUNNING
    _replace_rank_1(w)
    w.join(0, 0, "intact", after=1)  # rank 0 already left epoch 1 again (a later failure)
    w.arrive(1, 2)
    w.tick()
    assert json.loads(w.store.get(ft.key("join", 0)))["after"] == 1
    assert w.store.get(ft.key("join", 1)) == ft.EMPTY
