"""Fault tolerance: a dead or hung rank costs the job a pause, not a restart.

* ``launch``: the fault-tolerant launcher (one per node, instead of
  torchrun's agent): restarts only a dead worker; the first node's hosts
  the job's store and the coordinator.
* ``coordinator``: decides who trains together after a failure (membership
  epochs, ``membership``): in 2D the whole replica groups go on at once.
* ``member``: a worker's side: heartbeats, the abort of a failed epoch,
  joining the next one, the watchdog that logs long waits, the event log.
* ``recovery``: the trainer's component: re-form the groups in the same
  processes, restore only what was lost (a live replica's copy in 2D, the
  lost shard from the checkpoint in 1D), resume at the agreed step.
* ``inject`` and ``chaos``: failures on purpose, for tests and benchmarks.
* ``netns``: hosts in network namespaces with real links, for tests.

See docs/fault_tolerance.md.
"""
