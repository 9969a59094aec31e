"""Decision quality on labelled scenarios: loading, scoring, and the ``atm eval`` / ``atm explain`` commands.

A scenario is a YAML file: a policy, current parameter values, metric histories
(``key: [[step, value], ...]``), optional earlier interventions, and what a good decision
looks like (``expect``: acceptable diagnoses, ``any_of`` acceptable moves, ``forbid`` harmful
ones). Scoring judges what would actually be applied: the proposal after :func:`atm.policies.check`.

Per scenario:

- ``acceptable``: the diagnosis is one of the expected ones, the applied changes include one
  of ``any_of`` (or are empty when ``any_of`` is empty), and nothing harmful is applied.
- ``harmful``: an applied change or action matches ``forbid``.

Summary: ``acceptable_rate``, ``harmful_rate``, ``noop_precision`` (of the decisions that
applied nothing, the share where nothing was right; ``null`` when there were none) and
latency percentiles.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atm.policies import (
    DecisionContext,
    Policy,
    PolicyError,
    blocked,
    check,
    load_policy,
)
from atm.schema import Action, Change, DecisionRecord, Diagnosis, Proposal, Status, TelemetrySnapshot, fmt
from atm.watcher.proposer import Offer, Proposer, ProposerError
from atm.watcher.decide import Situation, offline_situation
from atm.watcher.proposers import make_proposer


class ScenarioError(ValueError):
    """A scenario file cannot be used. The message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expectation(_Strict):
    #: Diagnoses that count as right.
    diagnosis: list[Diagnosis]
    #: Acceptable moves: ``{param: up|down}`` or ``{action: stop|rollback}``. Empty: no change is right.
    any_of: list[dict[str, str]] = Field(default_factory=list)
    #: Harmful moves, in the same form.
    forbid: list[dict[str, str]] = Field(default_factory=list)

    @field_validator("any_of", "forbid")
    @classmethod
    def _moves(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        for item in v:
            if len(item) != 1:
                raise ValueError(
                    f"each entry names one move, like {{lr: down}} or {{action: rollback}}; got {item}"
                )
            ((key, val),) = item.items()
            if key == "action":
                if val not in {a.value for a in Action}:
                    raise ValueError(f"unknown action {val!r}; actions: {', '.join(a.value for a in Action)}")
            elif val not in ("up", "down"):
                raise ValueError(f"direction of {key!r} must be up or down, got {val!r}")
        return v


class PastIntervention(_Strict):
    """An intervention applied earlier in the run (shapes cooldowns and the prompt's effects table)."""

    seq: int
    step: int
    applied_step: int | None = None
    diagnosis: Diagnosis
    #: Parameter -> [old, new].
    changes: dict[str, tuple[float, float]] = Field(default_factory=dict)
    action: Action | None = None


class Scenario(_Strict):
    name: str
    description: str = ""
    #: A preset name or a policy file path (relative to the scenario file).
    policy: str
    run_name: str = ""
    params: dict[str, float]
    metrics: dict[str, list[tuple[int, float]]]
    interventions: list[PastIntervention] = Field(default_factory=list)
    expect: Expectation
    #: One sentence on the right decision (shown as the ideal answer's rationale in worked examples).
    rationale: str = ""
    source: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _has_metrics(self) -> Scenario:
        if not any(self.metrics.values()):
            raise ValueError("`metrics` holds no points")
        return self

    def load_policy(self) -> Policy:
        spec = self.policy
        if self.source and not Path(spec).is_absolute() and (Path(self.source).parent / spec).is_file():
            spec = str(Path(self.source).parent / spec)
        return load_policy(spec)

    def records(self) -> list[DecisionRecord]:
        return [
            DecisionRecord(
                run_id=self.name,
                seq=iv.seq,
                step=iv.step,
                status=Status.APPLIED,
                source="scenario",
                diagnosis=iv.diagnosis,
                changes={k: Change(old=o, new=n) for k, (o, n) in iv.changes.items()},
                action=iv.action,
                applied_step=iv.applied_step,
                # A scenario has one step axis: the change shows from where it was applied, else right
                # after the decision.
                effective_step=iv.applied_step if iv.applied_step is not None else iv.step + 1,
            )
            for iv in self.interventions
        ]


def situation(sc: Scenario, policy: Policy | None = None) -> Situation:
    """Snapshot, decision context and offer for a scenario, as the daemon would build them."""
    history = {k: sorted((int(s), float(v)) for s, v in pts) for k, pts in sc.metrics.items()}
    return offline_situation(
        sc.name, policy or sc.load_policy(), history, sc.params, sc.records(), run_name=sc.run_name
    )


def load_scenarios(directory: str | Path) -> list[Scenario]:
    """Every ``*.yaml`` scenario in ``directory``, sorted by name.

    Raises:
        ScenarioError: the folder is missing or empty, or a file breaks the format (file and field named).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ScenarioError(f"scenario folder {str(folder)!r} does not exist; pass --scenarios DIR")
    out = []
    for path in sorted(folder.glob("*.yaml")):
        out.append(load_scenario(path))
    if not out:
        raise ScenarioError(f"no *.yaml scenarios in {str(folder)!r}")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"scenario names must be unique; repeated: {', '.join(dupes)}")
    return sorted(out, key=lambda s: s.name)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        # The C loader when PyYAML has it: scenario files are long lists of points.
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping with name, policy, params, metrics, expect")
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: {errs}") from exc
    return sc.model_copy(update={"source": str(path)})


# --------------------------------------------------------------------------- scoring


class ScenarioResult(BaseModel):
    name: str
    #: ``None`` when the proposer failed (ProposerError).
    diagnosis: str | None
    #: What would be applied: parameter -> new value, and ``action`` -> action name.
    changes: dict[str, float | str]
    acceptable: bool
    harmful: bool
    latency_s: float


class Summary(BaseModel):
    n: int
    acceptable_rate: float
    harmful_rate: float
    noop_precision: float | None
    latency_p50_s: float
    latency_p95_s: float


class EvalReport(BaseModel):
    proposer: str
    summary: Summary
    scenarios: list[ScenarioResult]


def applied_moves(proposal: Proposal, sit: Situation) -> tuple[dict[str, float | str], list[dict[str, str]]]:
    """What :func:`check` lets through, as result ``changes`` and as ``{param: up|down}`` / ``{action: x}`` moves."""
    if proposal.is_noop:
        return {}, []
    verdict = check(proposal, sit.policy, sit.ctx)
    if not verdict.accepted:
        return {}, []
    changes: dict[str, float | str] = {k: c.new for k, c in verdict.changes.items()}
    moves = [{k: "up" if c.new > c.old else "down"} for k, c in verdict.changes.items()]
    if verdict.action is not None:
        changes["action"] = verdict.action.value
        moves.append({"action": verdict.action.value})
    return changes, moves


def judge(sc: Scenario, diagnosis: Diagnosis | None, moves: list[dict[str, str]]) -> tuple[bool, bool]:
    """(acceptable, harmful) for the moves that would be applied."""
    harmful = any(m in sc.expect.forbid for m in moves)
    if sc.expect.any_of:
        remedy = any(m in sc.expect.any_of for m in moves)
    else:
        remedy = not moves
    acceptable = diagnosis is not None and diagnosis in sc.expect.diagnosis and remedy and not harmful
    return acceptable, harmful


def score(proposer: Proposer, scenarios: Sequence[Scenario], *, progress: Any = None) -> EvalReport:
    """Run ``proposer`` on every scenario and score what would be applied."""
    rows: list[ScenarioResult] = []
    noop_right = noop_total = 0
    policies: dict[str, Policy] = {}
    for sc in scenarios:
        key = f"{sc.source}|{sc.policy}"
        if key not in policies:
            policies[key] = sc.load_policy()
        sit = situation(sc, policies[key])
        t0 = time.perf_counter()
        try:
            result = proposer.propose(sit.snapshot, sit.policy, sit.ctx, sit.offer)
            proposal: Proposal | None = result.proposal
        except ProposerError:
            proposal = None
        latency = time.perf_counter() - t0
        if proposal is None:
            changes, moves, diagnosis = {}, [], None
        else:
            changes, moves = applied_moves(proposal, sit)
            diagnosis = proposal.diagnosis
        acceptable, harmful = judge(sc, diagnosis, moves)
        if not moves:
            noop_total += 1
            noop_right += not sc.expect.any_of
        rows.append(
            ScenarioResult(
                name=sc.name,
                diagnosis=diagnosis.value if diagnosis else None,
                changes=changes,
                acceptable=acceptable,
                harmful=harmful,
                latency_s=round(latency, 4),
            )
        )
        if progress is not None:
            progress(rows[-1])
    n = len(rows)
    lat = sorted(r.latency_s for r in rows)
    summary = Summary(
        n=n,
        acceptable_rate=_rate(sum(r.acceptable for r in rows), n),
        harmful_rate=_rate(sum(r.harmful for r in rows), n),
        noop_precision=_rate(noop_right, noop_total) if noop_total else None,
        latency_p50_s=round(percentile(lat, 50), 4),
        latency_p95_s=round(percentile(lat, 95), 4),
    )
    return EvalReport(
        proposer=getattr(proposer, "label", None) or proposer.name, summary=summary, scenarios=rows
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _rate(k: int, n: int) -> float:
    return round(k / n, 4) if n else 0.0


def format_report(report: EvalReport) -> str:
    """A plain-text table of one report."""
    lines = [f"proposer: {report.proposer}"]
    rows = [["scenario", "diagnosis", "applied", "ok", "harm", "latency_s"]]
    for r in report.scenarios:
        applied = ", ".join(f"{k}={v if isinstance(v, str) else fmt(v)}" for k, v in r.changes.items()) or "-"
        rows.append(
            [
                r.name,
                r.diagnosis or "(failed)",
                applied,
                "yes" if r.acceptable else "no",
                "YES" if r.harmful else "-",
                f"{r.latency_s:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    s = report.summary
    noop = "n/a" if s.noop_precision is None else f"{s.noop_precision:.0%}"
    lines.append(
        f"n={s.n}  acceptable={s.acceptable_rate:.0%}  harmful={s.harmful_rate:.0%}  noop_precision={noop}  "
        f"latency p50={s.latency_p50_s:.2f}s p95={s.latency_p95_s:.2f}s"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- explain


def render_explain(
    snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer, *, evidence: bool = True
) -> str:
    """What the default LLM proposer would be sent for this decision, and the offer, as text.

    ``offer`` is the one the daemon would make (for a live run, only the actions the job registered).
    Without ``evidence`` the messages are the same variant's without the rules' diagnosis.
    """
    from dataclasses import replace

    from atm.watcher.llm import LLMProposer
    from atm.watcher.llm_variants import DEFAULT_VARIANT, VARIANTS

    variant = VARIANTS[DEFAULT_VARIANT]
    if not evidence:
        variant = replace(variant, name=f"{variant.name}, no evidence", evidence=False, anchored=False)
    parts: list[str] = []
    for msg in LLMProposer(variant=variant).messages(snapshot, policy, offer):
        parts += [f"=== {msg['role']}", msg["content"], ""]
    parts.append("=== offer (what the validator accepts now)")
    if offer.choices:
        for param, values in sorted(offer.choices.items()):
            parts.append(f"  {param} (now {fmt(ctx.params[param])}): {', '.join(fmt(v) for v in values)}")
    else:
        why = blocked(policy, ctx)
        parts.append("  no parameter change is allowed now" + (f": {why}" if why else ""))
    parts.append("  actions: " + (", ".join(a.value for a in offer.actions) or "none"))
    return "\n".join(parts)


# --------------------------------------------------------------------------- CLI


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``atm eval`` on an argparse subparsers object; the handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "eval",
        help="score a proposer on labelled scenarios",
        description="Run a proposer on labelled scenarios and report acceptable and harmful decisions.",
    )
    p.add_argument(
        "--scenarios", default="tests/scenarios", help="folder of scenario YAML files (default: %(default)s)"
    )
    p.add_argument("--proposer", choices=("rules", "llm"), default="rules")
    p.add_argument(
        "--llm",
        dest="llm_model",
        default=None,
        help="embedded | local:/path.gguf | openai/<model> (or ATM_LLM)",
    )
    p.add_argument("--llm-base-url", default=None, help="OpenAI-compatible base URL (or ATM_LLM_BASE_URL)")
    p.add_argument("--variant", default=None, help="LLM prompting variant (default: the measured best)")
    p.add_argument(
        "--only", action="append", default=[], help="run only scenarios whose name contains this (with --dataset: family/run, e.g. arm/ or aux/) (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--dataset",
        default=None,
        help="score on a counterfactual decision dataset (.jsonl or .jsonl.gz, benchmarks/counterfactual/) "
        "instead of the scenarios, beside the fixed strategies",
    )
    p.add_argument(
        "--split",
        choices=("all", "train", "test"),
        default="all",
        help="with --dataset: only the families of this split (test: the held-out ones)",
    )
    p.add_argument(
        "--points",
        choices=("all", "main", "follow-ups"),
        default="all",
        help="with --dataset: the main runs' decision points, the follow-up points (an earlier remedy in "
        "effect, not yet measured), or both (default: %(default)s)",
    )
    p.add_argument(
        "--horizon",
        choices=("branch", "end"),
        default="branch",
        help="with --dataset: judge moves at the branches' horizon, or at the run's end (only the points "
        "generate.py --to-end branched that far) (default: %(default)s)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="with --dataset: decide under this preset or policy file instead of each line's own "
        "(to compare policies, e.g. with and without limits.settle)",
    )
    p.set_defaults(func=eval_command)
    return p


def eval_command(args: argparse.Namespace) -> int:
    if args.dataset:
        return dataset_command(args)
    try:
        scenarios = load_scenarios(args.scenarios)
    except ScenarioError as exc:
        print(f"atm eval: {exc}", file=sys.stderr)
        return 2
    if args.only:
        scenarios = [s for s in scenarios if any(o in s.name for o in args.only)]
    try:
        proposer = make_proposer(args.proposer, llm=args.llm_model, base_url=args.llm_base_url, variant=args.variant)
    except ValueError as exc:  # unknown variant or an unusable LLM setting (the message names it)
        print(f"atm eval: {exc}", file=sys.stderr)
        return 2
    progress = (
        None if args.json else (lambda r: print(f"  {r.name}: {r.diagnosis} {r.changes}", file=sys.stderr))
    )
    try:
        report = score(proposer, scenarios, progress=progress)
    except PolicyError as exc:
        print(f"atm eval: {exc}", file=sys.stderr)
        return 2
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0


def dataset_command(args: argparse.Namespace) -> int:
    """``atm eval --dataset FILE``: the proposer and the fixed strategies on one split of the dataset."""
    import json

    from atm.watcher.counterfactual import (
        BASELINES,
        DatasetError,
        format_dataset_reports,
        judged_at,
        load_dataset,
        score_dataset,
        select,
    )

    try:
        lines = select(load_dataset(args.dataset), args.split, args.points)
        if args.only:
            picked = [ln for ln in lines if any(o in f"{ln.family}/{ln.run}" for o in args.only)]
            if not picked:
                names = sorted({ln.family for ln in lines})
                raise DatasetError(f"no line of split {args.split!r} matches --only {' '.join(args.only)}; "
                                   f"its families are {', '.join(names)} (--only family/ or family/run)")
            lines = picked
        lines = judged_at(lines, args.horizon)
        if args.policy:
            load_policy(args.policy)  # a bad policy is named before any decision is made
        proposer = make_proposer(args.proposer, llm=args.llm_model, base_url=args.llm_base_url, variant=args.variant)
    except (DatasetError, ValueError) as exc:
        print(f"atm eval: {exc}", file=sys.stderr)
        return 2
    try:
        reports = [score_dataset(p, lines, dataset=str(args.dataset), split=args.split, policy=args.policy)
                   for p in [proposer, *(make() for make in BASELINES.values())]]
    except PolicyError as exc:
        print(f"atm eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    else:
        print(format_dataset_reports(reports))
    return 0


def explain_command(args: argparse.Namespace) -> int:
    try:
        sc = load_scenario(args.scenario)
        sit = situation(sc)
    except (ScenarioError, PolicyError, OSError) as exc:
        print(f"atm explain: {exc}", file=sys.stderr)
        return 2
    print(render_explain(sit.snapshot, sit.policy, sit.ctx, sit.offer, evidence=not args.no_evidence))
    return 0


__all__ = [
    "EvalReport",
    "Expectation",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "Situation",
    "Summary",
    "add_eval_parser",
    "applied_moves",
    "format_report",
    "judge",
    "load_scenario",
    "load_scenarios",
    "render_explain",
    "score",
    "situation",
]
