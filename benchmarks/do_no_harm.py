"""First, do no harm: healthy jobs under atm against the same jobs alone, closed loop, as a user runs them.

A user's script (``benchmarks/jobs/digits_job.py``: an MLP on scikit-learn's digits, logging train and
val loss to MLflow once an epoch) runs in several healthy configurations a user might leave it in:
Adam at its default lr and at a smaller one, SGD with momentum, plain SGD at a small lr, SGD under a
30-epoch warm-up. For each configuration and seed it runs twice, side by side: alone, and with atm's
listener while ``atm-watch --proposer rules`` (the CLI, in its own process) watches the run. Each has
its own local MLflow store. The figure is the managed run's final val loss over its twin's: above 1
is harm. The jobs are deterministic given the seed; what atm changes is the only difference.

    python benchmarks/do_no_harm.py [--seeds 3] [--configs adam-1e-3,sgd-0.01] [--epochs 120] [--full]

With ``--full`` the managed job is the README's full integration (rollback to its best weights offered;
on ``stop`` it restores them and ends, and its final is the restored model's): stops are measured too.
Writes benchmarks/results/do_no_harm.json and .md (``do_no_harm_full`` with --full) and prints the
table (about 1 min a pair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import write

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "benchmarks" / "jobs" / "digits_job.py"
#: The atm CLI of this interpreter (``atm-watch`` is ``atm watch``), whatever is on PATH.
ATM = [sys.executable, "-m", "atm.watcher.cli"]

#: Healthy configurations: name -> the job's arguments.
CONFIGS: dict[str, list[str]] = {
    "adam-1e-3": ["--optimizer", "adam", "--lr", "1e-3"],
    "adam-3e-4": ["--optimizer", "adam", "--lr", "3e-4"],
    "sgd-momentum-0.05": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"],
    "sgd-0.01": ["--optimizer", "sgd", "--lr", "0.01"],
    "sgd-momentum-warmup": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--warmup-epochs", "30"],
}


def _final(out: str) -> float:
    line = next((ln for ln in out.splitlines() if ln.startswith("FINAL ")), None)
    if line is None:
        raise SystemExit(f"the job printed no FINAL line:\n{out[-2000:]}")
    return float(line.split()[1])


def start(tmp: Path, job_args: list[str], label: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """The digits job with ``job_args`` in its own store under ``tmp``: the process and its store's URI."""
    uri = f"sqlite:///{tmp / f'{label}.db'}"
    proc = subprocess.Popen([sys.executable, str(JOB), *job_args, "--tracking-uri", uri, "--name", label, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, uri


def watched(proc: subprocess.Popen, uri: str, interval: float, others: list[subprocess.Popen]) -> tuple[str, list[dict[str, Any]]]:
    """Watch the managed job ``proc`` with ``atm-watch --proposer rules`` until it ends: its output and
    the decisions from ``atm history --json``. ``others`` are killed if it never starts a run."""
    assert proc.stdout is not None
    first = ""
    for line in proc.stdout:  # MLflow's own log lines come first on a new store
        first += line
        if line.startswith("RUN "):
            break
    else:
        for o in others:
            o.kill()
        raise SystemExit(f"the managed job did not start a run:\n{first[-2000:]}")
    rid = first.splitlines()[-1].split()[1]
    watch = subprocess.Popen([*ATM, "watch", "--backend", "mlflow", "--run", rid, "--tracking-uri", uri,
                              "--policy", "lm", "--proposer", "rules", "--interval", str(interval), "--no-table"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = first + proc.communicate()[0]
    try:
        watch.wait(60)  # atm-watch ends with the run it watches, after its last poll
    except subprocess.TimeoutExpired:
        watch.kill()
        raise SystemExit(f"atm-watch did not end within 60 s of run {rid} ending") from None
    hist = subprocess.run([*ATM, "history", "--backend", "mlflow", "--run", rid, "--tracking-uri", uri, "--json"],
                          capture_output=True, text=True)
    if hist.returncode != 0:
        # Without the decisions a ratio away from 1 would go unexplained: no figure rather than a wrong one.
        raise SystemExit(f"atm history failed on run {rid} (exit {hist.returncode}): {hist.stderr[-2000:]}")
    return out, [
        {"step": r["step"], "status": r["status"], "diagnosis": r["diagnosis"], "action": r["action"],
         "changes": {k: [c["old"], c["new"]] for k, c in r["changes"].items()}, "effect": r.get("effect")}
        for r in json.loads(hist.stdout)
    ]


def stopped_at(out: str) -> int | None:
    return next((int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("STOPPED ")), None)


def pair(tmp: Path, config: str, seed: int, epochs: int, interval: float, full: bool = False) -> dict[str, Any]:
    """The configuration alone and managed, side by side, each in its own store."""
    job = [*CONFIGS[config], "--seed", str(seed), "--epochs", str(epochs)]
    alone, _ = start(tmp, job, f"{config}-{seed}-alone")
    managed, uri = start(tmp, job, f"{config}-{seed}-managed", "--managed", *(["--full"] if full else []))
    out_managed, records = watched(managed, uri, interval, [alone])
    out_alone = alone.communicate()[0]
    fa, fm = _final(out_alone), _final(out_managed)
    return {"config": config, "seed": seed, "alone": fa, "managed": fm, "ratio": fm / fa,
            "stopped_at": stopped_at(out_managed), "decisions": records}


def applied(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's decisions that the job applied."""
    return [d for d in r["decisions"] if d["status"] == "applied"]


def decisions(r: dict[str, Any]) -> str:
    """The applied decisions of a run, one line: diagnosis, step, changes and action."""
    if not applied(r):
        return "none"
    return "; ".join(f"{d['diagnosis']} @{d['step']}: " + ", ".join(
        [f"{k} {a:g}->{b:g}" for k, (a, b) in d["changes"].items()] + ([d["action"]] if d["action"] else []))
        for d in applied(r))


def arguments(doc: str, known: dict[str, list[str]], epochs: int) -> argparse.ArgumentParser:
    """The options the closed-loop benchmarks share: seeds, configurations, epochs, polling interval."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--configs", default=",".join(known), help="comma-separated (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--interval", type=float, default=1.0, help="atm-watch's polling interval, seconds")
    return p


def chosen(text: str, known: dict[str, list[str]], prog: str) -> list[str]:
    """The configurations named in ``--configs`` (comma-separated); exits 2 naming the known ones otherwise."""
    configs = [c for c in text.split(",") if c]
    unknown = [c for c in configs if c not in known]
    if unknown:
        print(f"{prog}: unknown configurations {unknown}; choose from {', '.join(known)}", file=sys.stderr)
        raise SystemExit(2)
    return configs


def main() -> int:
    p = arguments(__doc__, CONFIGS, epochs=120)
    p.add_argument("--full", action="store_true",
                   help="the managed job offers rollback and acts on stop (restoring its best weights)")
    args = p.parse_args()
    configs = chosen(args.configs, CONFIGS, "do_no_harm")
    runs: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for config in configs:
            for seed in range(args.seeds):
                r = pair(Path(d), config, seed, args.epochs, args.interval, args.full)
                runs.append(r)
                print(f"[{time.time() - t0:5.0f}s] {config:20s} seed {seed}: managed {r['managed']:.4f}, alone "
                      f"{r['alone']:.4f} ({r['ratio']:.3f}x); {decisions(r)}"
                      + (f"; stopped at epoch {r['stopped_at']}" if r["stopped_at"] else ""), flush=True)
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        ratios = [r["ratio"] for r in mine]
        rows.append([config, f"{statistics.fmean(r['alone'] for r in mine):.4f}",
                     f"{statistics.fmean(r['managed'] for r in mine):.4f}",
                     f"{statistics.fmean(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})",
                     f"{max(ratios):.3f}", f"{sum(len(applied(r)) for r in mine)}",
                     ", ".join(str(r["stopped_at"]) for r in mine if r["stopped_at"]) or "none"])
    all_ratios = [r["ratio"] for r in runs]
    rows.append(["all", "", "", f"{statistics.fmean(all_ratios):.3f}", f"{max(all_ratios):.3f}",
                 f"{sum(len(applied(r)) for r in runs)}",
                 f"{sum(1 for r in runs if r['stopped_at'])} of {len(runs)}"])
    write("do_no_harm_full" if args.full else "do_no_harm",
          {"runs": runs, "epochs": args.epochs, "interval_s": args.interval, "seeds": args.seeds, "full": args.full}, rows,
          ["configuration", "final val loss alone", "managed", "managed / alone (per seed)", "worst", "decisions applied",
           "stopped at epoch"],
          notes=(f"Job: benchmarks/jobs/digits_job.py, {args.epochs} epochs, one evaluation an epoch, 0.25 s between "
                 f"epochs; seeds 0-{args.seeds - 1} (the model's initialisation); `atm-watch --proposer rules --policy lm "
                 f"--interval {args.interval:g}`. "
                 + ("The managed job offers rollback to its best weights and on stop restores them and ends. " if args.full
                    else "The managed job has atm's two lines only (it neither rolls back nor stops). ")
                 + "Above 1 the managed run ended worse than alone. "
                 f"Command: `python benchmarks/do_no_harm.py --seeds {args.seeds}{' --full' if args.full else ''}`."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
