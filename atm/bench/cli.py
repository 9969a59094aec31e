"""``atm bench WORKLOAD``: registers one subcommand per benchmark with the ``atm`` command line."""

from __future__ import annotations

import importlib
from typing import Any

#: Benchmark name -> module with ``add_parser(subparsers)``. A module whose optional dependencies are
#: missing (the RL stack for ``manipulation``) is left out of ``atm bench --help``.
BENCHMARKS = {
    "tinystories": "atm.bench.tinystories",
    "manipulation": "atm.bench.manipulation",
}


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="reproduce the paper's benchmarks: fixed recipes against the manager")
    bsub = p.add_subparsers(dest="workload", required=True)
    for module in BENCHMARKS.values():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.add_parser(bsub)
