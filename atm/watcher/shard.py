"""Which runs a replica of atm-watch owns when N replicas share one experiment.

A run belongs to shard ``sha256(run_id) mod N``: a stable hash (Python's ``hash()`` of a string
changes from process to process), so every replica with the same N agrees on every run without
talking to the others, and a restarted replica owns the same runs as before.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: A StatefulSet pod's name: ``<set name>-<ordinal>``; Kubernetes sets it as the pod's HOSTNAME.
_ORDINAL_RE = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based: a StatefulSet's ordinals)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"the number of shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist: shards are numbered 0 to {self.count - 1}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def owns(run_id: str, shard: Shard | None) -> bool:
    """Whether the replica running ``shard`` manages ``run_id``; every run is owned without sharding (None)."""
    if shard is None:
        return True
    digest = hashlib.sha256(run_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard.count == shard.index


def resolve_shard(flag: str | None, env: Mapping[str, str]) -> Shard | None:
    """The shard this replica runs, from ``--shard`` (``flag``) or the environment; None without sharding.

    ``k/N`` names both. A bare ``N`` (``--shard N``, or ``ATM_SHARDS=N``) takes k from the ordinal at
    the end of ``HOSTNAME``, as in a StatefulSet's pods ``atm-watch-0`` ... ``atm-watch-{N-1}``. The
    flag wins over ``ATM_SHARD``, which wins over ``ATM_SHARDS``.

    Raises:
        ValueError: a malformed value, k outside 0..N-1, or a bare N with no ordinal in HOSTNAME;
            the message names the setting to change.
    """
    source, spec = next(((s, v) for s, v in (("--shard", flag), ("ATM_SHARD", env.get("ATM_SHARD")),
                                             ("ATM_SHARDS", env.get("ATM_SHARDS"))) if v), ("", None))
    if spec is None:
        return None
    k_text, slash, n_text = spec.strip().rpartition("/")
    try:
        count = int(n_text)
        index = int(k_text) if slash else None
    except ValueError:
        raise ValueError(f"{source} {spec!r}: expected k/N (this replica's shard k of N, from 0) or N") from None
    if index is None:
        host = env.get("HOSTNAME", "")
        m = _ORDINAL_RE.search(host)
        if m is None:
            raise ValueError(
                f"{source} {spec!r} gives the number of shards but not this replica's: HOSTNAME {host!r} does not "
                f"end in -<ordinal> as a StatefulSet pod's name does; give k/N (e.g. --shard 0/{count})"
            )
        index = int(m.group(1))
        if index >= count:
            raise ValueError(
                f"pod {host!r} has ordinal {index} but {source} says {count} shards: set the StatefulSet's "
                f"replicas and the number of shards to the same N"
            )
    try:
        return Shard(index, count)
    except ValueError as exc:
        raise ValueError(f"{source} {spec!r}: {exc}") from None


__all__ = ["Shard", "owns", "resolve_shard"]
