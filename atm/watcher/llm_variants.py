"""How the LLM is prompted: the variants, which moves address which diagnosis, and worked examples.

Variants (measured on the scenario suite by ``benchmarks/decision_quality.py``):

- ``plain``: the snapshot tables only; one schema for every diagnosis.
- ``evidence``: plus the rules proposer's diagnosis and evidence, marked as a heuristic.
- ``two-stage``: a free-text reasoning call, then a formatting call that sees the reasoning.
- ``few-shot``: worked examples (prompt and ideal answer) before the snapshot.
- ``coherent``: the schema branches on the diagnosis, and each branch offers only the moves
  that address it (:data:`REMEDY_DIRECTIONS`: no lowering dropout for overfitting, no stop
  on a healthy run). ``coherent+evidence`` adds the rules' evidence.
- ``anchored``: the rules' detectors fix the diagnosis; the model chooses among the moves
  and actions that address it and explains the choice. When nothing may be done (healthy,
  too early, nothing offered) the model is not called.
- ``brief`` (the default): ``anchored`` asked in few tokens, for a small model on a busy CPU
  (``benchmarks/llm_latency.py``). The system message is the policy alone (its parameters'
  bounds), the same for every decision on a run, so an in-process model keeps it in its KV
  cache; the user message is a few lines: the problem and its evidence (with its numbers), the
  values in force, the last two changes with their measured effect, the moves nearest the values
  in force (three a side) and the actions that address the problem, and the rules' own choice as
  a suggested answer. The answer is flat and short (``{"moves", "action", "why"}``, ``why`` at
  most 40 characters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from atm.policies import Policy, load_policy
from atm.schema import Action, Diagnosis, TelemetrySnapshot
from atm.watcher.decide import offline_situation
from atm.watcher.prompt import Move, offered_moves
from atm.watcher.proposer import Offer
from atm.watcher.snapshot import is_rl

REASON_PROMPT = (
    "In two or three short sentences: what is happening to this run, and which allowed move "
    "(or none) addresses it? Do not write JSON yet."
)
FORMAT_PROMPT = "Now give your decision as one JSON object."

Direction = Literal["up", "down", "any"]

#: Which moves address which diagnosis (``coherent`` variants); nothing moves for ``healthy``,
#: ``insufficient_data`` or ``converged``. A parameter no entry names (a custom knob) is not offered
#: in coherent mode, as the rules never move one either: use the ``plain`` variant for such policies.
#: Keys ending in ``.`` match every parameter with that prefix; ``loss_weight.*`` directions come
#: from the loss components (:func:`loss_weight_directions`).
REMEDY_DIRECTIONS: dict[Diagnosis, dict[str, Direction]] = {
    Diagnosis.OVERFITTING: {"dropout": "up", "weight_decay": "up", "lr": "down"},
    Diagnosis.DIVERGENCE: {"lr": "down", "clip_range": "down", "target_kl": "down"},
    Diagnosis.PLATEAU: {"lr": "down"},
    Diagnosis.LR_TOO_LOW: {"lr": "up"},
    Diagnosis.OVER_REGULARIZATION: {"dropout": "down", "weight_decay": "down"},
    Diagnosis.LOSS_IMBALANCE: {"loss_weight.": "any"},
    Diagnosis.EXPLORATION_COLLAPSE: {"ent_coef": "up", "clip_range": "up"},
    Diagnosis.UNSAFE_EXPLORATION: {
        "reward.collision_penalty": "up",
        "lr": "down",
        "ent_coef": "down",
        "clip_range": "down",
        "target_kl": "down",
        "n_epochs": "down",
    },
}
#: A stalled RL run needs bolder updates, not smaller ones.
RL_PLATEAU_DIRECTIONS: dict[str, Direction] = {
    "lr": "up",
    "n_epochs": "up",
    "clip_range": "up",
    "target_kl": "up",
    "ent_coef": "up",
}
REMEDY_ACTIONS: dict[Diagnosis, tuple[Action, ...]] = {
    Diagnosis.OVERFITTING: (Action.ROLLBACK,),
    Diagnosis.DIVERGENCE: (Action.ROLLBACK,),
    Diagnosis.UNSAFE_EXPLORATION: (Action.ROLLBACK,),
    Diagnosis.CONVERGED: (Action.STOP,),
}
_QUIET = (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA, Diagnosis.CONVERGED)


@dataclass(frozen=True)
class Variant:
    """How the model is prompted and constrained."""

    name: str
    evidence: bool = False
    two_stage: bool = False
    few_shot: int = 0
    coherent: bool = False
    anchored: bool = False
    #: The short prompt, the rules' choice as a suggestion and the flat answer (implies ``anchored``).
    brief: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain"),
        Variant("evidence", evidence=True),
        Variant("two-stage", two_stage=True),
        Variant("few-shot", few_shot=3),
        Variant("coherent", coherent=True),
        Variant("coherent+evidence", coherent=True, evidence=True),
        Variant("anchored", coherent=True, evidence=True, anchored=True),
        Variant("brief", coherent=True, evidence=True, anchored=True, brief=True),
    )
}
DEFAULT_VARIANT = "brief"


def remedy_moves(diagnosis: Diagnosis, moves: Sequence[Move], snapshot: TelemetrySnapshot,
                 policy: Policy | None = None) -> list[Move]:
    """The offered moves that address ``diagnosis`` (see :data:`REMEDY_DIRECTIONS`). A parameter of a
    policy group (``actor_lr`` in group ``lr``) moves as its group does."""
    if diagnosis in _QUIET:
        return []
    if is_rl(snapshot) and diagnosis == Diagnosis.PLATEAU:
        table = RL_PLATEAU_DIRECTIONS
    elif diagnosis == Diagnosis.LOSS_IMBALANCE:
        table = loss_weight_directions(snapshot)
    else:
        table = REMEDY_DIRECTIONS.get(diagnosis, {})
    out = []
    for m in moves:
        rule = policy.params.get(m.param) if policy is not None else None
        want = _direction(table, m.param) or (_direction(table, rule.group) if rule is not None and rule.group else None)
        if want == "any" or want == m.direction:
            out.append(m)
    return out


def loss_weight_directions(snapshot: TelemetrySnapshot) -> dict[str, Direction]:
    """For loss imbalance: lower the weight of the dominant loss component, raise the vanishing one's.

    ``loss_weight.aux`` belongs to a component whose key ends in ``aux`` (``loss/aux``,
    ``train/loss_aux``). Weights of components in between, or of none, may move either way.
    """
    comps = {
        st.key.rsplit("/", 1)[-1].removeprefix("loss_"): abs(st.ema)
        for role, st in snapshot.series.items()
        if role.startswith("loss_components[")
    }
    out: dict[str, Direction] = {"loss_weight.": "any"}
    if len(comps) >= 2:
        big, small = max(comps, key=comps.__getitem__), min(comps, key=comps.__getitem__)
        out[f"loss_weight.{big}"] = "down"
        out[f"loss_weight.{small}"] = "up"
    return out


def _direction(table: dict[str, Direction], param: str) -> Direction | None:
    if param in table:
        return table[param]
    return next((d for key, d in table.items() if key.endswith(".") and param.startswith(key)), None)


# --------------------------------------------------------------------------- worked examples


@dataclass(frozen=True)
class Example:
    """A worked example for few-shot prompting: the prompt inputs and the ideal answer."""

    name: str
    snapshot: TelemetrySnapshot
    policy: Policy
    offer: Offer
    answer: dict[str, Any]


def make_example(
    name: str,
    policy: Policy,
    history: dict[str, list[tuple[int, float]]],
    params: dict[str, float],
    diagnosis: Diagnosis,
    changes: dict[str, float],
    action: Action | None,
    rationale: str,
) -> Example:
    """An example from metric history and the ideal decision (checked against the offer)."""
    sit = offline_situation(name, policy, history, params, run_name=name)
    snap, offer = sit.snapshot, sit.offer
    labels = {(m.param, m.value): m.label for m in offered_moves(offer, params)}
    missing = [p for p, v in changes.items() if (p, v) not in labels]
    if missing or (action is not None and action not in offer.actions):
        raise ValueError(f"example {name!r}: {missing or action} is not in its own offer")
    decision: dict[str, Any] = {
        "diagnosis": diagnosis.value,
        "moves": [labels[(p, v)] for p, v in changes.items()],
    }
    if offer.actions:
        decision["action"] = action.value if action else "none"
    answer = {
        "decision": decision,
        "rationale": rationale,
        "expected_outcome": _EXPECTED.get(diagnosis, "no change needed"),
        "watch_next": _WATCH.get(diagnosis, "the primary metric"),
    }
    return Example(name=name, snapshot=snap, policy=policy, offer=offer, answer=answer)


_EXPECTED = {
    Diagnosis.OVERFITTING: "val loss stops rising; the gap narrows",
    Diagnosis.UNSAFE_EXPLORATION: "collision rate falls",
}
_WATCH = {Diagnosis.OVERFITTING: "val_loss and the gap", Diagnosis.UNSAFE_EXPLORATION: "collision rate"}


def _curve(steps: Iterable[int], f: Any) -> list[tuple[int, float]]:
    return [(s, round(f(s), 4)) for s in steps]


def bundled_examples() -> list[Example]:
    """Three worked examples shipped with atm (overfitting, healthy, unsafe exploration).

    They are written for the prompt, not taken from the evaluation suite, so scoring the
    ``few-shot`` variant on the suite never shows the model its own test cases.
    """
    lm, rl = load_policy("lm"), load_policy("rl-ppo")
    overfit = make_example(
        "example-overfitting",
        lm,
        {
            "train_loss": _curve(range(0, 601, 20), lambda s: 0.3 + 2.7 * math.exp(-s / 150)),
            "val_loss": _curve(
                range(60, 601, 60), lambda s: 1.6 + 1.5 * math.exp(-s / 100) + max(0.0, s - 300) * 0.0012
            ),
        },
        {"lr": 0.002, "weight_decay": 0.0, "dropout": 0.0},
        Diagnosis.OVERFITTING,
        {"dropout": 0.1},
        Action.ROLLBACK,
        "val loss rose 20% from its best while train loss kept falling",
    )
    healthy = make_example(
        "example-healthy",
        lm,
        {
            "train_loss": _curve(range(0, 601, 20), lambda s: 1.0 + 2.0 * math.exp(-s / 400)),
            "val_loss": _curve(range(60, 601, 60), lambda s: 1.1 + 2.0 * math.exp(-s / 400)),
        },
        {"lr": 0.001, "weight_decay": 0.01, "dropout": 0.1},
        Diagnosis.HEALTHY,
        {},
        None,
        "both losses still fall and the gap is small",
    )
    unsafe = make_example(
        "example-unsafe",
        rl,
        {
            "eval/safe_success": _curve(range(10240, 102401, 10240), lambda s: 0.1),
            "eval/collision_rate": _curve(range(10240, 102401, 10240), lambda s: 0.5 + s * 1e-6),
            "train/entropy": _curve(range(2048, 102401, 4096), lambda s: 3.0),
        },
        {
            "lr": 0.001,
            "ent_coef": 0.05,
            "clip_range": 0.3,
            "n_epochs": 8,
            "target_kl": 0.1,
            "reward.collision_penalty": 2.5,
            "reward.success_bonus": 10,
            "reward.progress_scale": 5,
        },
        Diagnosis.UNSAFE_EXPLORATION,
        {"reward.collision_penalty": 5.0},
        None,
        "over half of the episodes end in a collision",
    )
    return [overfit, healthy, unsafe]
