"""The benchmark harness: reference workloads run fixed and managed, through the real tracker and daemon.

It drives both sides (it starts training processes and the daemon that watches them), so it lives
in a room of its own: the workloads in ``atm.training.workloads`` stay user code that only logs and
listens, and the watcher knows nothing of benchmarks.
"""
