"""``atm-train WORKLOAD ...``: run a reference workload with the listener in place."""

from __future__ import annotations

import sys

WORKLOADS = {
    "tinystories": "atm.training.workloads.tinystories.cli",
    "manipulation": "atm.training.workloads.manipulation.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in WORKLOADS:
        print("usage: atm-train {%s} [options]   (atm-train WORKLOAD --help for options)" % ",".join(WORKLOADS))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(WORKLOADS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
