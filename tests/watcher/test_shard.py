"""Sharding: which replica owns a run (a partition, stable across processes) and how a replica finds its shard."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atm.watcher.shard import Shard, owns, resolve_shard

run_ids = st.one_of(st.uuids().map(lambda u: u.hex), st.text(min_size=1, max_size=40))


@settings(max_examples=300, deadline=None)
@given(run_id=run_ids, count=st.integers(min_value=1, max_value=8))
def test_every_run_is_owned_by_exactly_one_shard(run_id: str, count: int) -> None:
    owners = [k for k in range(count) if owns(run_id, Shard(k, count))]
    assert len(owners) == 1


def test_runs_are_spread_over_the_shards() -> None:
    ids = [uuid.UUID(int=i * 7919 + 13).hex for i in range(4000)]
    per_shard = [sum(owns(r, Shard(k, 4)) for r in ids) for k in range(4)]
    assert sum(per_shard) == len(ids)
    assert min(per_shard) > 800  # 1000 each on average: no shard is left (nearly) empty


def test_ownership_is_the_same_in_another_process() -> None:
    # Python's hash() of a string differs between processes (PYTHONHASHSEED); replicas must agree.
    ids = [uuid.UUID(int=i).hex for i in range(50)]
    mine = [k for r in ids for k in range(5) if owns(r, Shard(k, 5))]
    code = ("from atm.watcher.shard import Shard, owns; import uuid; "
            "print([k for r in [uuid.UUID(int=i).hex for i in range(50)] for k in range(5) if owns(r, Shard(k, 5))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert out.strip() == str(mine)


def test_no_shard_owns_everything() -> None:
    assert owns("anything", None)


@pytest.mark.parametrize(("flag", "env", "expected"), [
    ("2/4", {}, Shard(2, 4)),
    (None, {"ATM_SHARD": "1/3"}, Shard(1, 3)),
    ("0/2", {"ATM_SHARD": "1/3"}, Shard(0, 2)),                       # the flag wins
    ("4", {"HOSTNAME": "atm-watch-3"}, Shard(3, 4)),                  # a StatefulSet pod's ordinal
    (None, {"ATM_SHARDS": "4", "HOSTNAME": "atm-watch-0"}, Shard(0, 4)),
    (None, {"ATM_SHARD": "2/5", "ATM_SHARDS": "4", "HOSTNAME": "atm-watch-0"}, Shard(2, 5)),
    (None, {"HOSTNAME": "atm-watch-3"}, None),                        # no sharding asked for
])
def test_a_replica_finds_its_shard(flag: str | None, env: dict[str, str], expected: Shard | None) -> None:
    assert resolve_shard(flag, env) == expected


@pytest.mark.parametrize(("flag", "env", "said"), [
    ("4", {"HOSTNAME": "laptop"}, "does not end in -<ordinal>"),
    ("4", {"HOSTNAME": "atm-watch-4"}, "ordinal 4 but --shard says 4 shards"),
    ("4/4", {}, "shards are numbered 0 to 3"),
    ("a/b", {}, "expected k/N"),
    (None, {"ATM_SHARD": "0/0"}, "ATM_SHARD '0/0': the number of shards must be at least 1"),
])
def test_a_shard_that_cannot_be_right_is_refused_with_what_to_change(flag: str | None, env: dict[str, str], said: str) -> None:
    with pytest.raises(ValueError, match=said.replace("(", r"\(")):
        resolve_shard(flag, env)
