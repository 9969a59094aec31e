"""Keeping the replicas of a ``torch.distributed`` job (DDP, FSDP, ``torchrun``) in step.

Every rank has its own optimizer and model: a change applied on one rank alone gives the replicas
different learning rates or dropout, and their weights drift apart for good. So rank 0 receives the
manager's updates, and every ``every`` optimizer steps all ranks meet in one broadcast of what rank 0
has; then each applies the same updates at the same step. The broadcast is a collective: every rank
must call ``atm.listen(..., distributed=True)``, which is why it is asked for, not guessed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from atm.schema import Update

#: Optimizer steps between two meetings of the ranks (one small broadcast each).
SYNC_EVERY = 10


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when torch.distributed is not in use."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@dataclass
class RankSync:
    """One process's side of the broadcast."""

    rank: int
    size: int
    every: int = SYNC_EVERY

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def due(self, steps_seen: int) -> bool:
        return steps_seen % self.every == 0

    def share(self, updates: list[Update]) -> list[Update]:
        """Rank 0's ``updates``, on every rank (what the others pass is ignored)."""
        import torch.distributed as dist

        box: list[Any] = [[u.model_dump(mode="json") for u in updates] if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return [Update.model_validate(u) for u in box[0] or []]
