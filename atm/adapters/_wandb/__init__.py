"""The W&B backend: offline and local runs through their transaction log and an inbox folder,
online runs through the public API. Import it as :mod:`atm.adapters.wandb_backend`.

- ``_txlog``: reading ``run-<id>.wandb`` incrementally while the job writes it;
- ``_local``: the run directory's layout, run discovery, atomic message files;
- ``_online``: the public API, paced, and the run-file mailbox for online runs;
- ``_ui``: charts, table, tags and files written through the job's own ``wandb.run``;
- ``_backend``: :class:`WandbBackend` (daemon) and :class:`WandbChannel` (listener).

The folder is ``_wandb``, not ``wandb``: git ignores every ``wandb/`` folder (W&B's run output).
"""

from __future__ import annotations

try:
    import wandb  # noqa: F401  (fail here, with the install hint, rather than deep inside)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the W&B backend needs wandb: pip install 'atm[wandb]'") from exc

from atm.adapters._wandb._backend import UnreadableRun, WandbBackend, WandbChannel, run_status

__all__ = ["UnreadableRun", "WandbBackend", "WandbChannel", "run_status"]
