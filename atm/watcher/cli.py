"""Command line: ``atm-watch`` (the daemon) and ``atm`` (history, policy, explain, eval, demo)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from atm.policies import Policy, PolicyError, load_policy, policy_json_schema

log = logging.getLogger("atm.watch")


# --------------------------------------------------------------------------- shared options


def _add_backend_args(p: argparse.ArgumentParser, many: bool = False, experiment: bool = False) -> None:
    p.add_argument("--backend", choices=["mlflow", "wandb"], default=os.environ.get("ATM_BACKEND") or None,
                   help="tracker the job logs to (default: $ATM_BACKEND; without it atm-watch takes mlflow, and the "
                        "commands reading a run (or history's --experiment) look for it in MLflow, then in W&B's "
                        "offline runs)")
    p.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                   help=("run to watch (repeatable)" if many else "the run")
                   + ". W&B: a run directory, run id, or entity/project/run_id")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default store in the "
                        "current folder; "
                        + ("--run refuses a store that does not exist, --experiment waits for one)" if experiment
                           else "a store that does not exist is refused, not created)"))
    p.add_argument("--wandb-dir", default=None,
                   help="W&B: the folder holding the job's offline-run-* folders (default: $WANDB_DIR/wandb, else ./wandb)")


def _add_proposer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="lm", help="preset name (lm, rl-ppo) or YAML file (default: lm)")
    p.add_argument("--proposer", choices=["rules", "llm"], default="rules",
                   help="who proposes changes (default: rules): deterministic rules, or an LLM (--llm, default the "
                        "embedded SmolLM2) with the rules as fallback")
    p.add_argument("--llm", default=None,
                   help="LLM for --proposer llm: embedded (default), local:/path/model.gguf, openai/<model> ($ATM_LLM)")
    p.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 ($ATM_LLM_BASE_URL)")
    from atm.watcher.llm_variants import DEFAULT_VARIANT, VARIANTS

    p.add_argument("--llm-variant", choices=list(VARIANTS), default=DEFAULT_VARIANT,
                   help=f"how the LLM is prompted (default {DEFAULT_VARIANT}: the rules' detectors fix the diagnosis, "
                        "the model chooses the moves); compare them with `atm eval --variant`")


def _key(command: str) -> Any:
    """The key this process signs and checks with; exits with the fix when there is none."""
    from atm.signing import KeyUnavailable, resolve_key

    try:
        return resolve_key()
    except KeyUnavailable as exc:
        raise SystemExit(f"{command}: {exc}") from None


def _backend(args: argparse.Namespace, key: Any, *, watching: bool = False) -> Any:
    """The backend named by the arguments, signing and checking with ``key``. ``watching``: for atm-watch,
    whose ``--experiment`` (and ``--run`` with ``--wait`` on W&B) waits for the job to create the store or
    folder; the commands that read a run refuse one that does not exist rather than make it."""
    from atm.adapters import make_backend

    if args.backend == "mlflow":
        # MLflow's client retries a dead server for about four minutes; atm's commands say so in
        # seconds, and the daemon retries on its own with back-off.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # Connections sized to the daemon's calls at once: one per poll worker and one for listing the
        # experiment. A database store (sqlite:///, postgresql://) opened in this process gets as many
        # again in reserve (past them, calls wait and then fail); a server's HTTP pool keeps at least
        # requests' 10 (past it, connections are opened and dropped, not refused). MLflow reads these
        # when it makes the store, so they are set before the backend is; the user's own values win.
        calls = getattr(args, "workers", 1) + 1
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(calls))
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", str(calls))
        os.environ.setdefault("MLFLOW_HTTP_POOL_MAXSIZE", str(max(10, calls)))
        # A watcher of an experiment may start before the job creates the store; a run id, or an experiment
        # to read, is only in a store that exists.
        existing = not (watching and getattr(args, "experiment", None))
        try:
            # The environment's URI named here: the process's MLflow may have been pointed elsewhere (tests, the demo).
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
            return make_backend("mlflow", tracking_uri=uri, existing=existing, key=key)
        except ValueError as exc:
            raise SystemExit(f"atm: {exc}") from None
        except Exception as exc:  # MLflow refuses the URI itself (an unknown scheme, a malformed path)
            raise SystemExit(f"atm: cannot use MLflow tracking URI {args.tracking_uri!r}: {exc}".strip()) from None
    waits = watching and (getattr(args, "experiment", None) or getattr(args, "wait", 0) > 0)
    if args.wandb_dir and not os.path.isdir(args.wandb_dir) and not waits:
        # (--experiment, and --run with --wait, wait for the job to create it: a watcher started before
        # the job is the README's pattern; a --run alone can only be in a folder that exists.)
        raise SystemExit(f"atm: --wandb-dir {args.wandb_dir}: no such folder ({os.path.abspath(args.wandb_dir)}); give "
                         "the folder that holds the job's offline-run-* folders: ./wandb where the job ran, or "
                         "$WANDB_DIR/wandb when the job set WANDB_DIR")
    return make_backend("wandb", wandb_dir=args.wandb_dir, key=key)


def _tracker_down(args: argparse.Namespace) -> str:
    """Non-empty, saying so, when ``args`` name an MLflow server (http or https) that does not answer
    within 3 s. MLflow's client would retry it for many seconds before saying anything."""
    from atm.watcher.locate import server_down

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.backend != "mlflow" or not uri.startswith(("http://", "https://")):
        return ""
    return server_down(uri)


def _policy(spec: str) -> Policy:
    from atm.watcher.rules import Thresholds

    try:
        policy = load_policy(spec, known_thresholds=Thresholds.names())
    except (PolicyError, ValueError) as exc:
        raise SystemExit(f"atm: {exc}") from None
    return policy


#: The one shape of every line atm-watch logs (``14:25:23 INFO atm.watch: run <id>: ...``).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    if level.upper() != "DEBUG":
        # Each retry of a request to a server that is down is a WARNING with the full URL; the daemon
        # says once that the tracker is unreachable, and again when it is back.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        # Every LLM request at INFO, and each failed attempt as an ERROR with its traceback: the daemon
        # says in one line when a proposer fails, and the decision's audit keeps every attempt.
        for name in ("httpx", "httpx2", "httpcore", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("instructor").setLevel(logging.CRITICAL)
        # What MLflow's own logging set-up keeps quiet, for a process that leaves MLflow's loggers to this
        # one (atm-watch): a new store's migrations and every SQL statement.
        for name in ("alembic", "sqlalchemy.engine"):
            logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- atm-watch


def watch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atm-watch",
        description="Watch live training runs and manage them within a policy.",
        epilog="example: atm-watch --backend mlflow --run 3f2a... --tracking-uri sqlite:///mlflow.db --proposer rules",
    )
    _add_backend_args(p, many=True, experiment=True)
    p.add_argument("--experiment", default=None, help="watch every RUNNING run of this experiment (MLflow) or project (W&B)")
    p.add_argument("--project", dest="experiment", help=argparse.SUPPRESS)
    _add_proposer_args(p)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls of each run (default: 5)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads polling runs, each run by one at a time, the runs spread over the interval "
                        "(default: 4); proposals run on threads of their own")
    p.add_argument("--shard", default=None, metavar="k/N",
                   help="with --experiment: watch only the runs whose id hashes to shard k of N, so that N replicas "
                        "share an experiment. A bare N takes k from the pod's ordinal (HOSTNAME atm-watch-3: k=3), "
                        "as in a Kubernetes StatefulSet (default: $ATM_SHARD, or $ATM_SHARDS with the ordinal)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (/metrics), a liveness check (/healthz) and readiness (/readyz) "
                        "on this port, all interfaces (needs pip install 'atm[server]')")
    p.add_argument("--health-file", default=None, metavar="PATH",
                   help="rewrite this file every few seconds while the watch is live: a liveness check without a "
                        "port (stale for more than 5 minutes: the watch has stalled)")
    p.add_argument("--once", action="store_true", help="poll each run once, decide if due, and exit")
    p.add_argument("--dry-run", action="store_true", help="decide and record, but publish nothing to the job")
    p.add_argument("--approve", action="store_true",
                   help="hold every accepted decision until a person approves it (run tag atm.approve = <seq> in the "
                        "tracker's UI, or `atm approve --run RUN SEQ`), as the policy's limits.approval: required does")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="keep looking for a --run that does not exist yet for S seconds (a W&B run id set in "
                        "advance with WANDB_RUN_ID); default: fail at once")
    p.add_argument("--log-level", default="INFO",
                   help="without the live table: INFO (default) logs each run's status as it changes and every "
                        "decision; WARNING only what needs attention")
    p.add_argument("--no-table", action="store_true",
                   help="log lines even on a terminal, each `HH:MM:SS LEVEL logger: message`")
    return p


def watch_main(argv: Sequence[str] | None = None) -> int:
    args = watch_parser().parse_args(argv)
    if not args.run and not args.experiment:
        watch_parser().error("give --run RUN_ID (repeatable) or --experiment NAME")
    if args.interval <= 0:
        watch_parser().error(f"--interval must be positive, got {args.interval}")
    if args.workers < 1:
        watch_parser().error(f"--workers must be at least 1, got {args.workers}")
    from atm.watcher.shard import resolve_shard

    try:
        shard = resolve_shard(args.shard, os.environ)
    except ValueError as exc:
        watch_parser().error(str(exc))
    if shard is not None and not args.experiment:
        watch_parser().error(f"shard {shard} (from --shard, ATM_SHARD or ATM_SHARDS) divides the runs of an "
                             "--experiment among replicas; with --run you choose the runs yourself")
    table = sys.stdout.isatty() and not args.no_table and not args.once
    # MLflow's lines go through this process's logging, in the same shape as atm's, not through a handler
    # and format of MLflow's own (read when mlflow is first imported, below).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    _setup_logging("WARNING" if table else args.log_level)
    from atm.adapters import BackendUnavailable, RunNotFound
    from atm.watcher.daemon import Daemon
    from atm.watcher.proposers import make_proposer

    policy = _policy(args.policy)
    try:
        proposer = make_proposer(args.proposer, policy, llm=args.llm, base_url=args.llm_base_url,
                                 variant=args.llm_variant)
        if args.proposer == "llm":
            # A missing key, model file or package is said now, not at the first decision (after
            # which every decision would fall back to the rules). Nothing is loaded or called here.
            proposer.client  # noqa: B018
    except (ImportError, ValueError, RuntimeError) as exc:
        print(f"atm-watch: cannot start the {args.proposer} proposer: {exc}", file=sys.stderr)
        return 2
    service = _service(args)
    if isinstance(service, int):
        return service
    key = _key("atm-watch")
    args.backend = args.backend or "mlflow"
    down = _tracker_down(args)
    if down:
        # Said now, not after the client's retries; the daemon retries with back-off and says when it answers.
        log.warning("%s; watching anyway, retrying in the background until it answers (check --tracking-uri if it "
                    "should be up)", down)
    backend = _backend(args, key, watching=True)
    daemon = Daemon(backend, policy, proposer, interval=args.interval, dry_run=args.dry_run, wait_for_run=args.wait,
                    workers=args.workers, shard=shard, hooks=service, key=key, approve=args.approve)

    if args.once:
        run_ids = list(args.run)
        try:
            if args.experiment:
                from atm.watcher.shard import owns

                run_ids += [rid for rid in backend.running_runs(args.experiment) if owns(rid, shard)]
            for rid in run_ids:
                daemon.tick(rid, wait=True)
        except (RunNotFound, BackendUnavailable) as exc:
            print(f"atm-watch: {exc}", file=sys.stderr)
            return 1
        finally:
            daemon.stop()
        for s in daemon.status.values():
            print(f"{s.run_id}  step {s.step}  {s.state}  {s.diagnosis}  decisions {s.decisions}  {s.last}")
        return _gave_up(daemon)

    def _terminate(signum: int, _frame: Any) -> None:
        daemon.stop_event.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if table:
        from atm.watcher.status import live_table

        stop_display = live_table(daemon)
    else:
        from atm.watcher.status import log_changes

        daemon.on_change = log_changes()
        stop_display = None
    who = getattr(proposer, "name", args.proposer)
    if args.proposer == "llm":
        who += f" {proposer.client.name}, variant {proposer.variant.name}"  # which model, and where: a wrong setting shows here, not in the audit
    banner = (f"watching {', '.join(args.run) or 'experiment ' + repr(args.experiment)} "
              f"({args.backend}, policy {policy.name}, proposer {who}, "
              f"every {args.interval:g}s, {args.workers} workers{f', shard {shard}' if shard else ''}"
              f"{', dry run' if args.dry_run else ''}{', approval required' if daemon.approve else ''}"
              f"{_service_note(args)}; key id {key.key_id} from {key.source}); Ctrl-C or SIGTERM stops")
    if table:
        print(f"atm-watch: {banner}", flush=True)  # above the table
    else:
        log.info("%s", banner)
    try:
        daemon.watch(args.run, experiment=args.experiment)
    finally:
        daemon.stop()
        if service is not None:
            service.close()
        if stop_display:
            stop_display()
    errors = [s for s in daemon.status.values() if s.state == "not found"]
    for s in errors:
        log.error("run %s: %s", s.run_id, s.error)
    return max(1 if errors and len(errors) == len(daemon.status) else 0, _gave_up(daemon))


def _gave_up(daemon: Any) -> int:
    """1, after saying why, when the daemon stopped managing a run for a reason it cannot get past."""
    stopped = [s for s in daemon.status.values() if s.gave_up]
    for s in stopped:
        log.error("run %s: stopped managing it: %s", s.run_id, s.gave_up)
    return 1 if stopped else 0


def _service(args: argparse.Namespace) -> Any:
    """The metrics endpoint and health file asked for (None when neither), or an exit code after an error."""
    if args.metrics_port is None and args.health_file is None:
        return None
    from atm.watcher.service import Service

    try:
        service = Service(metrics=args.metrics_port is not None, health_file=args.health_file)
        if args.metrics_port is not None:
            service.serve(args.metrics_port)
    except (ImportError, OSError) as exc:
        print(f"atm-watch: {exc}", file=sys.stderr)
        return 2
    return service


def _service_note(args: argparse.Namespace) -> str:
    note = f", metrics on :{args.metrics_port}" if args.metrics_port is not None else ""
    return note + (f", health file {args.health_file}" if args.health_file else "")


# --------------------------------------------------------------------------- atm


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader stopped early (`atm eval ... | head`): not a failure of atm's, and Python would print
        # a traceback for it, then another when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer its reader left


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="atm", description="AI Training Manager")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("history", help="the interventions on a run, or on every run of an experiment, as a table or JSON",
                       description="The decisions atm made on a run, from its decision log: give one --run, or "
                                   "--experiment for every run of an experiment (a sweep), oldest first, each "
                                   "under its run id.")
    _add_backend_args(h)
    h.add_argument("--experiment", default=None,
                   help="every run of this experiment (MLflow) or project (W&B: a project of the offline runs "
                        "under --wandb-dir, or entity/project), running or ended (default: none; give --run or this)")
    h.add_argument("--json", action="store_true",
                   help="print a JSON list: a run's interventions; with --experiment, one item a run, "
                        "{run_id, name, status, interventions}")

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    psub.add_parser("schema", help="print the policy JSON Schema (for editor completion)")
    chk = psub.add_parser("check", help="validate a policy file")
    chk.add_argument("file")
    show = psub.add_parser("show", help="print a preset as YAML")
    show.add_argument("name")

    sub.add_parser("watch", help="same as atm-watch", add_help=False)

    demo = sub.add_parser("demo", help="run the bundled demo: an overfitting job twice on one seed, unmanaged and managed live, on a local MLflow store")
    demo.add_argument("--dir", default="atm-demo", help="working folder for the MLflow store (default: ./atm-demo)")
    demo.add_argument("--proposer", choices=["rules", "llm"], default=None, help="default: llm if installed, else rules")
    demo.add_argument("--quick", action="store_true", help="a shorter run")

    ex = sub.add_parser("explain", help="show what the LLM would be sent for a run now (prompt and allowed moves)",
                        description="What the proposer would be shown for a run now: the snapshot, the allowed moves, "
                                    "and what blocks a move (warm-up, cooldown, budget). Give one --run, or "
                                    "--experiment for each of its running runs.")
    _add_backend_args(ex)
    ex.add_argument("--experiment", default=None,
                    help="explain every RUNNING run of this experiment (MLflow) or project (W&B), one after another "
                         "(default: none; give --run or this)")
    ex.add_argument("--policy", default="lm", help="preset name or YAML file (default: lm)")
    ex.add_argument("--scenario", default=None, help="explain a scenario file instead of a live run")
    ex.add_argument("--no-evidence", action="store_true", help="leave out the rules' diagnosis")

    for verb in ("approve", "reject"):
        ap = sub.add_parser(verb, help=f"{verb} a decision held for approval (signed with this machine's atm key)")
        _add_backend_args(ap)
        ap.add_argument("seq", type=int, help="the decision's number (atm history shows it, status awaiting-approval)")
        ap.add_argument("--note", default="", help="why, kept with the decision")

    _optional_subcommands(sub)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "watch":
        return watch_main(argv[1:])
    args = p.parse_args(argv)
    _setup_logging("WARNING")
    if args.command == "history":
        return _history(args)
    if args.command == "policy":
        return _policy_cmd(args)
    if args.command == "explain":
        return _explain(args)
    if args.command in ("approve", "reject"):
        return _answer(args)
    if args.command == "demo":
        from atm.bench.demo import run_demo

        return run_demo(args)
    handler = getattr(args, "func", None)
    if handler is not None:
        return int(handler(args) or 0)
    p.error(f"unknown command {args.command}")
    return 2


def _optional_subcommands(sub: Any) -> None:
    """Subcommands that live in other modules (explain, eval, bench); each registers its own parser."""
    for module, fn in (("atm.watcher.evaluate", "add_eval_parser"),
                       ("atm.bench.cli", "add_bench_parser")):
        try:
            mod = __import__(module, fromlist=[fn])
        except ImportError:
            continue
        register = getattr(mod, fn, None)
        if register is not None:
            register(sub)


def _explain(args: argparse.Namespace) -> int:
    from atm.watcher.evaluate import explain_command, render_explain

    if args.scenario:
        return explain_command(args)
    if args.experiment:
        return _explain_experiment(args)
    from atm.adapters.base import metric_keys
    from atm.watcher.decide import decision_inputs
    from atm.watcher.poll import missing_metric_note

    policy = _policy(args.policy)
    got = _read_run(args, "explain")
    if isinstance(got, int):
        return got
    view, records = got
    snapshot, ctx, offer = decision_inputs(policy, view, records)
    if view.listener is None:
        print("note: no listener has attached to this run yet, so no parameter values are known and nothing "
              "can be offered; add atm.listen(...) to the training script\n")
    missing = missing_metric_note(policy, metric_keys(view))
    if missing:
        print(f"note: {missing}\n")
    print(render_explain(snapshot, policy, ctx, offer, evidence=not args.no_evidence))
    return 0


def _explain_experiment(args: argparse.Namespace) -> int:
    """``atm explain --experiment NAME``: the explanation of each running run, under a heading naming it."""
    from atm.adapters import BackendUnavailable, RunNotFound

    if args.run:
        print("atm explain: give --run or --experiment, not both", file=sys.stderr)
        return 2
    args.backend = args.backend or "mlflow"
    down = _tracker_down(args)
    if down:
        print(f"atm explain: {down}; check --tracking-uri (or MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 1
    try:
        runs = _backend(args, _key("atm explain")).running_runs(args.experiment)
    except (RunNotFound, BackendUnavailable) as exc:
        print(f"atm explain: {exc}", file=sys.stderr)
        return 1
    if not runs:
        print(f"no running runs in {args.experiment!r}")
        return 0
    worst = 0
    for rid in runs:
        print(f"=== run {rid} ===")
        worst = max(worst, _explain(argparse.Namespace(**{**vars(args), "experiment": None, "run": [rid]})))
        print()
    return worst


def _read_run(args: argparse.Namespace, command: str) -> tuple[Any, list[Any]] | int:
    """The run's current view and its decisions (log merged with acks), or an exit code after an error."""
    if len(args.run) != 1:
        print(f"atm {command}: give exactly one --run" + (" (or --experiment NAME)" if command == "history" else ""),
              file=sys.stderr)
        return 2
    key = _key(f"atm {command}")
    if args.backend:
        down = _tracker_down(args)
        if down:  # said at once, rather than after the client's retries
            print(f"atm {command}: {down}; check --tracking-uri (or MLFLOW_TRACKING_URI) and that the server runs",
                  file=sys.stderr)
            return 1
        backend = _backend(args, key)
    else:
        backend = _find_backend(args, key, command)
        if isinstance(backend, int):
            return backend
    return _run_records(backend, args.run[0], key, command)


def _run_records(backend: Any, run_id: str, key: Any, command: str) -> tuple[Any, list[Any]] | int:
    """A run's current view and its decisions (log merged with acks), or 1 after saying what failed."""
    from atm.adapters import BackendUnavailable, RunNotFound
    from atm.watcher.reconcile import own_records, reconcile

    try:
        view = backend.poll(run_id)
        own, refused = own_records(backend.read_log(run_id), key, run_id=view.run_id)
        records, _ = reconcile(own, view)
    except (RunNotFound, BackendUnavailable) as exc:
        print(f"atm {command}: {exc}", file=sys.stderr)
        return 1
    if refused:
        print(f"atm {command}: {len(refused)} record(s) of the decision log are not shown: not signed with this "
              f"machine's atm key, key id {key.key_id} from {key.source} (the first: {refused[0]})", file=sys.stderr)
    if view.problems:
        print(f"atm {command}: {len(view.problems)} message(s) on the run were not taken (unsigned, another key's, "
              f"or malformed), e.g. {view.problems[0]}", file=sys.stderr)
    return view, records


def _find_backend(args: argparse.Namespace, key: Any, command: str) -> Any:
    """The backend holding ``--run`` when no ``--backend`` was given: MLflow (``--tracking-uri``,
    ``MLFLOW_TRACKING_URI`` or MLflow's default store), then W&B's offline runs (``--wandb-dir`` or
    ./wandb); ``args.backend`` is set to it. An exit code, after saying which flags to pass, when neither
    holds it. A path or ``entity/project/id`` is W&B's: MLflow ids have no slash."""
    from atm.watcher.locate import find_run

    run = args.run[0]
    names = ["wandb"] if "/" in run or os.sep in run else ["mlflow", "wandb"]
    backend, notes = find_run(run, [(n, _maker(args, key, n)) for n in names])
    if backend is not None:
        return backend
    args.backend = None
    if len(notes) == 1 and notes[0].startswith("no MLflow run") and "start of" in notes[0]:
        print(f"atm {command}: {notes[0]}", file=sys.stderr)  # found, cut short: the whole id is the answer
        return 1
    print(f"atm {command}: run {run} was not found, and --backend was not given. Looked in:\n  "
          + "\n  ".join(notes)
          + "\nPass --backend mlflow --tracking-uri URI (the job's MLFLOW_TRACKING_URI), or --backend wandb "
            "--wandb-dir DIR (the folder holding the job's offline-run-* folders) or --run entity/project/ID",
          file=sys.stderr)
    return 1


def _maker(args: argparse.Namespace, key: Any, name: str) -> Callable[[], Any]:
    """A factory of the backend ``name`` for the locate functions: it sets ``args.backend``, and raises
    ValueError, saying so, for an MLflow server that does not answer."""
    def build() -> Any:
        args.backend = name
        down = _tracker_down(args)
        if down:
            raise ValueError(down)
        return _backend(args, key)
    return build


def _experiment_runs(args: argparse.Namespace, key: Any, command: str) -> tuple[Any, list[str]] | int:
    """The backend holding ``--experiment`` and the experiment's runs, oldest first; or an exit code after
    saying where atm looked. Without ``--backend``: MLflow, then W&B's offline runs (an ``entity/project``
    is W&B's: MLflow's experiment names are looked up as given, a slash and all, only with --backend)."""
    from atm.watcher.locate import find_experiment

    experiment = args.experiment
    names = [args.backend] if args.backend else (["wandb"] if "/" in experiment else ["mlflow", "wandb"])
    backend, runs, notes = find_experiment(experiment, [(n, _maker(args, key, n)) for n in names])
    if backend is not None:
        return backend, runs
    if len(names) == 1:
        print(f"atm {command}: {notes[0].split(': ', 1)[1]}", file=sys.stderr)
        return 1
    args.backend = None
    print(f"atm {command}: experiment {experiment!r} was not found, and --backend was not given. Looked in:\n  "
          + "\n  ".join(notes)
          + "\nPass --backend mlflow --tracking-uri URI (the job's MLFLOW_TRACKING_URI), or --backend wandb "
            "--wandb-dir DIR (the folder holding the job's offline-run-* folders) or --experiment entity/project",
          file=sys.stderr)
    return 1


def _answer(args: argparse.Namespace) -> int:
    """``atm approve`` / ``atm reject``: a signed answer to a decision held for approval."""
    import getpass
    import socket

    from atm.schema import Approval, Status

    got = _read_run(args, args.command)
    if isinstance(got, int):
        return got
    _, records = got
    rec = next((r for r in records if r.seq == args.seq), None)
    if rec is None or rec.status != Status.AWAITING_APPROVAL:
        held = [r.seq for r in records if r.status == Status.AWAITING_APPROVAL]
        state = "is not in its decision log" if rec is None else f"is {rec.status.value}"
        print(f"atm {args.command}: decision #{args.seq} of run {args.run[0]} {state}; "
              + (f"awaiting approval: {', '.join(f'#{s}' for s in held)}" if held else "none awaits approval"),
              file=sys.stderr)
        return 1
    from atm.adapters import BackendUnavailable

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    approval = Approval(seq=args.seq, decision=args.command, by=f"{user}@{socket.gethostname()}", note=args.note)
    try:
        _backend(args, _key(f"atm {args.command}")).write_approval(args.run[0], approval)
    except BackendUnavailable as exc:
        print(f"atm {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"atm {args.command}: decision #{args.seq} ({rec.summary()}) {args.command.rstrip('e')}ed; the watcher "
          f"{'publishes it to the job' if args.command == 'approve' else 'drops it'} at its next poll of the run")
    return 0


def _history(args: argparse.Namespace) -> int:
    from atm.watcher.report import history_rows, print_history

    if args.experiment:
        return _history_experiment(args)
    got = _read_run(args, "history")
    if isinstance(got, int):
        return got
    _, records = got
    if args.json:
        print(json.dumps(history_rows(records), indent=2))
    else:
        print_history(args.run[0], records)
    return 0


def _history_experiment(args: argparse.Namespace) -> int:
    """``atm history --experiment NAME``: each run's table under its run id, oldest run first, or one JSON
    list of the runs. A run that cannot be read is said and skipped (exit 1 at the end)."""
    from atm.watcher.report import history_rows, print_history

    if args.run:
        print("atm history: give --run or --experiment, not both", file=sys.stderr)
        return 2
    key = _key("atm history")
    got = _experiment_runs(args, key, "history")
    if isinstance(got, int):
        return got
    backend, runs = got
    if not args.json:
        print(f"experiment {args.experiment!r}: {len(runs)} run{'s' if len(runs) != 1 else ''}, oldest first")
    worst, items = 0, []
    for rid in runs:
        one = _run_records(backend, rid, key, "history")
        if isinstance(one, int):
            worst = max(worst, one)
            continue
        view, records = one
        if args.json:
            items.append({"run_id": rid, "name": view.name, "status": view.status, "interventions": history_rows(records)})
        else:
            print_history(rid, records)
    if args.json:
        print(json.dumps(items, indent=2))
    return worst


def _policy_cmd(args: argparse.Namespace) -> int:
    if args.policy_command == "schema":
        print(policy_json_schema())
        return 0
    if args.policy_command == "show":
        from importlib import resources

        try:
            print(resources.files("atm.policies").joinpath(f"presets/{args.name}.yaml").read_text())
        except FileNotFoundError:
            print(f"atm policy show: no preset {args.name!r}", file=sys.stderr)
            return 2
        return 0
    try:
        from atm.watcher.rules import Thresholds

        pol = load_policy(args.file, known_thresholds=Thresholds.names())  # a file, or a preset's name
    except (PolicyError, ValueError, OSError) as exc:
        print(f"atm policy check: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok — policy {pol.name!r}, parameters {', '.join(pol.controllable())}, "
          f"actions {', '.join(a.value for a in pol.actions) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

