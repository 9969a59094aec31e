"""A torch.distributed job (two real gloo processes, DDP): every rank applies rank 0's updates at
the same optimizer step, so the replicas stay identical. Rank 0's tracker is the named FakeChannel;
what is under test is the ranks' agreement, through real collectives."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(rank: int, port: int, out: str, distributed: bool) -> None:
    import atm
    from atm.testing import FakeChannel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.0), torch.nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    channel = FakeChannel() if rank == 0 else None
    if distributed or rank == 0:
        listener = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, channel=channel,
                              poll_interval=0.005, distributed=distributed)
    lrs = []
    g = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        if rank == 0 and step == 5:
            channel.publish(1, lr=(0.1, 0.05), dropout=(0.0, 0.1))
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        time.sleep(0.005)  # room for rank 0's listener thread to fetch the update
    if distributed or rank == 0:
        listener.close()
    weights = [p.detach().sum().item() for p in model.parameters()]
    acks = {k: v.values for k, v in channel.acks.items()} if channel else {}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"lrs": lrs, "weights": weights, "acks": acks,
                                                        "dropout": model.module[1].p}))
    dist.destroy_process_group()


def _run(tmp_path: Path, distributed: bool) -> tuple[dict, dict]:
    mp.start_processes(_job, args=(_free_port(), str(tmp_path), distributed), nprocs=2, start_method="spawn")
    return tuple(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


def test_every_rank_applies_the_update_at_the_same_step(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, distributed=True)
    assert r0["lrs"] == r1["lrs"]
    first = r0["lrs"].index(0.05)
    assert 5 < first < STEPS and first % 10 == 9  # applied before optimizer step 10k (the 10kth)
    assert r0["dropout"] == r1["dropout"] == 0.1
    assert r0["weights"] == r1["weights"]  # the replicas are still identical
    assert r0["acks"] == {"1": {"lr": 0.05, "dropout": 0.1}}  # rank 0 acknowledges, once


def test_without_it_the_replicas_drift_apart(tmp_path: Path) -> None:
    # What distributed=True prevents: rank 0 alone changes its lr, and the weights differ from then on.
    r0, r1 = _run(tmp_path, distributed=False)
    assert 0.05 in r0["lrs"] and 0.05 not in r1["lrs"]
    assert r0["weights"] != r1["weights"]
