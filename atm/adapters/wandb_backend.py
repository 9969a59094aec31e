"""The W&B backend (daemon side) and channel (listener side); the code lives in :mod:`atm.adapters._wandb`.

On a run directory (``wandb/offline-run-<time>-<id>`` or ``wandb/run-<time>-<id>``) atm keeps:

- ``atm/inbox/update-NNNNNN.json``: one :class:`~atm.schema.Update` each, written by the daemon
  (local only: the inbox is not part of the uploaded run);
- ``atm/seq``: the last sequence number the daemon took;
- ``files/atm/outbox/ack-NNNNNN.json``: the listener's :class:`~atm.schema.Ack` for each;
- ``files/atm/listener.json``: what the listener announced (knobs, current values, pid, host);
- ``files/atm/interventions.jsonl``: every decision with its full context (uploaded with the run).

The daemon reads metrics from the run's transaction log (``run-<id>.wandb``), incrementally.
In the W&B UI, the job's listener writes ``atm/<param>`` charts, an ``atm/interventions`` table and
``atm#N ...`` tags through its own ``wandb.run``. Online runs elsewhere (``entity/project/run_id``)
are read through the public API and reached through run files; see :mod:`atm.adapters._wandb._online`.
"""

from __future__ import annotations

from atm.adapters._wandb import UnreadableRun, WandbBackend, WandbChannel, run_status

__all__ = ["UnreadableRun", "WandbBackend", "WandbChannel", "run_status"]
