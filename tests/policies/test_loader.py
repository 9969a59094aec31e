"""Loading policies: presets, YAML files, and errors that point at the file, the line and the field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from atm.policies import Policy, PolicyError, load_policy, parse_policy, policy_json_schema, preset_names
from atm.schema import Action

GOOD = """\
name: mine
metrics:
  train_loss: loss
  val_loss: [val_loss, eval_loss]
params:
  lr:
    min: 1.0e-5
    max: 0.1
    multipliers: [0.5, 2.0]
    cooldown: {evals: 2}
    budget: 3
    budget_window: {evals: 10}
  dropout:
    min: 0.0
    max: 0.5
    values: [0.0, 0.1]
frozen: [dropout]
actions:
  stop: {not_before: {evals: 5}}
limits:
  max_changes: 1
"""


@pytest.mark.parametrize("name", preset_names())
def test_presets_load(name: str) -> None:
    policy = load_policy(name)
    assert policy.name == name
    assert policy.params and policy.metrics
    assert policy.limits.eval_metric in policy.metrics


def test_preset_names_and_params() -> None:
    assert preset_names() == ["lm", "rl-ppo"]
    assert set(load_policy("lm").params) == {"lr", "weight_decay", "dropout", "loss_weight.aux"}
    assert set(load_policy("rl-ppo").params) == {
        "lr", "ent_coef", "clip_range", "n_epochs", "target_kl",
        "reward.collision_penalty", "reward.success_bonus", "reward.progress_scale",
    }


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    policy = load_policy(path)
    assert policy.name == "mine"
    # A single metric key is accepted in place of a list.
    assert policy.metrics["train_loss"] == ["loss"]
    assert policy.controllable() == ["lr"]
    assert policy.actions[Action.STOP].not_before.evals == 5
    assert policy.params["lr"].budget_window is not None and policy.params["lr"].budget_window.evals == 10
    assert load_policy(str(path)) == policy


def test_missing_file_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"no such file, and not a preset name \(presets: lm, rl-ppo\)"):
        load_policy(tmp_path / "nope.yaml")


def _error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg.replace(str(path), "FILE")


# (id, yaml, expected "FILE:line: field `x`" prefix, words of the explanation)
BAD = [
    (
        "unknown key",
        """\
        name: x
        params:
          lr:
            min: 0.1
            max: 1
            multipliers: [2]
            cooldwn: {evals: 2}
        """,
        "FILE:7: field `params.lr.cooldwn`",
        "Extra inputs are not permitted",
    ),
    (
        "wrong type",
        """\
        name: x
        params:
          lr:
            min: small
            max: 1
            multipliers: [2]
        """,
        "FILE:4: field `params.lr.min`",
        "valid number",
    ),
    (
        "min above max",
        """\
        name: x
        params:
          lr:
            min: 2
            max: 1
            multipliers: [2]
        """,
        "FILE:3: field `params.lr`",
        "min (2.0) must be a number no greater than max (1.0)",
    ),
    (
        "budget without window",
        """\
        name: x
        params:
          lr:
            min: 0.1
            max: 1
            multipliers: [2]
            budget: 3
        """,
        "FILE:3: field `params.lr`",
        "`budget` needs a `budget_window`",
    ),
    (
        "values outside bounds",
        """\
        name: x
        params:
          dropout:
            min: 0
            max: 0.5
            values: [0.1, 0.9]
        """,
        "FILE:3: field `params.dropout`",
        "values [0.9] lie outside [min, max] = [0.0, 0.5]",
    ),
    (
        "no moves",
        """\
        name: x
        params:
          dropout: {min: 0, max: 0.5}
        """,
        "FILE:3: field `params.dropout`",
        "give `multipliers` or `values`",
    ),
    (
        "negative multiplier",
        """\
        name: x
        params:
          lr:
            min: 0.1
            max: 1
            multipliers: [2, -1]
        """,
        "FILE:6: field `params.lr.multipliers`",
        "multipliers must be positive numbers, got [-1.0]",
    ),
    (
        "frozen name not in params",
        """\
        name: x
        params:
          lr: {min: 0.1, max: 1, multipliers: [2]}
        frozen: [lr, dropuot]
        """,
        "FILE:4: field `frozen`",
        "frozen names ['dropuot'] are not in `params` (['lr'])",
    ),
    (
        "unknown action",
        """\
        name: x
        actions:
          restart: {}
        """,
        "FILE:3: field `actions.restart",
        "'stop' or 'rollback'",
    ),
    (
        "missing name",
        """\
        params: {}
        """,
        "FILE:1: field `name`",
        "Field required",
    ),
    (
        "bad limits",
        """\
        name: x
        limits:
          max_changes: 0
        """,
        "FILE:3: field `limits.max_changes`",
        "greater than or equal to 1",
    ),
    (
        "unknown metric role",
        """\
        name: x
        metrics:
          reward: [eval/mean_reward]
        """,
        "FILE:2: field `metrics`",
        "unknown metric roles ['reward']; the roles atm reads are train_loss, val_loss,",
    ),
    (
        "eval_metric not mapped",
        """\
        name: x
        metrics:
          return: [eval/mean_reward]
        limits:
          eval_metric: safe_success
        """,
        "FILE:4: field `limits`",
        "eval_metric 'safe_success' is not one of this policy's metric roles (return)",
    ),
    (
        "a key given twice",
        """        name: x
        params:
          lr: {min: 1.0e-5, max: 1.0e-2, multipliers: [0.5, 2]}
          dropout: {min: 0, max: 0.5, values: [0.1]}
          lr: {min: 1.0e-5, max: 1.0, multipliers: [0.5, 2]}
        """,
        "FILE:5:",
        "`lr` is given twice (first at line 3); keep one",
    ),
]


@pytest.mark.parametrize("text, where, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_errors_name_file_line_and_field(text: str, where: str, words: str, tmp_path: Path) -> None:
    msg = _error(text, tmp_path)
    line = next((ln.strip() for ln in msg.splitlines() if where in ln), None)
    assert line is not None, msg
    assert line.startswith(where), msg
    assert words in line, msg


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    msg = _error(
        """\
        name: x
        params:
          lr: {min: 2, max: 1, multipliers: [2]}
          wd: {min: 0, max: 1, values: [3]}
        """,
        tmp_path,
    )
    assert "FILE:3: field `params.lr`" in msg
    assert "FILE:4: field `params.wd`" in msg


def test_yaml_syntax_error_has_the_line(tmp_path: Path) -> None:
    msg = _error(
        """\
        name: x
        params:
          lr:
            min: 0.1
            multipliers: [2, 3
            max: 1
        """,
        tmp_path,
    )
    assert msg.startswith("FILE:"), msg
    line = int(msg.split(":")[1])
    assert 5 <= line <= 7, msg
    assert "not valid YAML" in msg and "unclosed [" in msg


@pytest.mark.parametrize(
    "text, line, hint",
    [
        ("name: x\nparams:\n  lr:\n    min: 0.1\n     max: 1\n", 5, "check this line's indentation"),
        ("name: x\nparams:\n\tlr: {min: 0.1}\n", 3, "indent with spaces, not tabs"),
    ],
)
def test_yaml_syntax_errors_say_what_usually_causes_them(text: str, line: int, hint: str) -> None:
    # YAML's own words ("mapping values are not allowed here") name the parser's state, not the mistake.
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source="p.yaml")
    assert str(err.value).startswith(f"p.yaml:{line}: not valid YAML") and hint in str(err.value), err.value


def test_not_a_mapping() -> None:
    with pytest.raises(PolicyError, match=r"^<string>:1: a policy is a YAML mapping"):
        parse_policy("- just\n- a list\n")
    with pytest.raises(PolicyError, match=r"got NoneType"):
        parse_policy("")


def test_json_schema() -> None:
    schema = json.loads(policy_json_schema())
    assert "params" in schema["properties"]
    assert schema["required"] == ["name"]
    # Every preset satisfies the same model the schema was made from.
    for name in preset_names():
        Policy.model_validate(load_policy(name).model_dump())


def test_a_misspelled_threshold_is_reported_at_its_line_with_the_other_errors() -> None:
    # Seen in a trial: it was reported without file or line, and only after the other errors were fixed.
    text = "name: x\nparams:\n  lr: {min: 1.0e-6, max: 1.0, multipliers: [0.5]}\nfrozen: [nope]\nthresholds:\n  solved_retrun: 475\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source="p.yaml", known_thresholds={"solved_return", "overfit_rise"})
    msg = str(err.value)
    assert "p.yaml:6: field `thresholds.solved_retrun`: unknown threshold; did you mean `solved_return`?" in msg
    assert "p.yaml:4: field `frozen`" in msg
    # Without the names (the policies room does not know the proposer's), thresholds are not judged.
    assert parse_policy(text.replace("frozen: [nope]\n", ""), source="p.yaml").thresholds == {"solved_retrun": 475}
