"""``extends:`` in policy files, unknown parameter names, and windows written the wrong way.

Shaped after the script that motivated them: a custom PPO trainer logging ``charts/episodic_return``
and ``charts/safe_success`` at ``step=update``, whose author copied the 75-line ``rl-ppo`` preset to
rename two metrics and count the warm-up in evaluations.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from atm.policies import PolicyError, load_policy, parse_policy
from atm.policies._loader import meant_param

MINE = """\
extends: rl-ppo
metrics:
  return: [charts/episodic_return]
  safe_success: [charts/safe_success]
params:
  lr: {max: 1.0e-3}
  n_epochs: null
limits:
  warmup: {evals: 3}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_file_that_extends_a_preset_gives_only_what_differs(tmp_path: Path) -> None:
    preset = load_policy("rl-ppo")
    mine = load_policy(write(tmp_path, "my-ppo.yaml", MINE))
    assert mine.name == "my-ppo" and mine.extends == "rl-ppo"  # the file's name, not the preset's
    # Lists are replaced, mappings merged key by key.
    assert mine.metrics["return"] == ["charts/episodic_return"]
    assert mine.metrics["collision"] == preset.metrics["collision"]
    assert mine.params["lr"].max == 1.0e-3
    assert mine.params["lr"].min == preset.params["lr"].min
    assert mine.params["lr"].multipliers == preset.params["lr"].multipliers
    # null removes the base's key; an omitted one keeps it.
    assert "n_epochs" not in mine.params and "ent_coef" in mine.params
    assert mine.limits.warmup.evals == 3 and mine.limits.warmup.steps == 0
    assert mine.limits.eval_metric == preset.limits.eval_metric
    assert mine.actions == preset.actions


def test_extends_a_relative_file_which_extends_a_preset(tmp_path: Path) -> None:
    (tmp_path / "team").mkdir()
    write(tmp_path / "team", "base.yaml", "extends: rl-ppo\nname: team-ppo\nlimits: {max_changes: 1}\n")
    mine = write(tmp_path, "mine.yaml", "extends: team/base.yaml\nname: mine\nparams:\n  ent_coef: {max: 0.05}\n")
    policy = load_policy(mine)
    assert policy.name == "mine" and policy.limits.max_changes == 1 and policy.params["ent_coef"].max == 0.05
    assert policy.params["clip_range"] == load_policy("rl-ppo").params["clip_range"]


def test_errors_name_the_file_and_line_that_gave_the_field(tmp_path: Path) -> None:
    # The error is in the extension (min above the preset's max): it points at the extension's line.
    path = write(tmp_path, "mine.yaml", "extends: rl-ppo\nparams:\n  lr:\n    min: 0.1\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert f"{path}:3: field `params.lr`: Value error, min (0.1) must be a number no greater than max" in str(err.value)
    path = write(tmp_path, "typo.yaml", "extends: rl-ppo\nlimits:\n  warmup: {evals: 2}\n  cooldwn: {evals: 1}\n")
    with pytest.raises(PolicyError, match=rf"{path}:4: field `limits.cooldwn`: Extra inputs are not permitted"):
        load_policy(path)


@pytest.mark.parametrize(
    "text, words",
    [
        ("extends: rl-pop\n", "field `extends`: 'rl-pop' ("),
        ("extends: [rl-ppo]\n", "field `extends`: give a preset name (lm, rl-ppo) or a policy file's path"),
    ],
)
def test_a_bad_extends_says_what_it_takes(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, "mine.yaml", text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}:1: ") and words in str(err.value), err.value
    assert "no such file, and not a preset name" in str(err.value) or "give a preset" in str(err.value)


def test_extends_in_a_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nextends: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nextends: a.yaml\n")
    with pytest.raises(PolicyError, match=r"extends, in turn, this file"):
        load_policy(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "name, meant",
    [("learning_rate", "lr"), ("weight_decayy", "weight_decay"), ("entropy_coef", "ent_coef"),
     ("rewards.collision_penalty", "reward.collision_penalty"), ("drop_out", "dropout")],
)
def test_a_parameter_named_like_a_builtin_knob_gets_a_did_you_mean(tmp_path: Path, name: str, meant: str) -> None:
    path = write(tmp_path, "mine.yaml", f"extends: lm\nparams:\n  {name}: {{min: 0, max: 1, values: [0.5]}}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert f"{path}:3: field `params.{name}`: unknown parameter; did you mean `{meant}`?" in str(err.value)


@pytest.mark.parametrize("name", ["lr", "actor_lr", "label_smoothing", "loss_weight.kl", "reward.energy", "beta2"])
def test_builtin_and_own_knob_names_pass(name: str) -> None:
    assert meant_param(name) is None


@pytest.mark.parametrize(
    "window, words",
    [("2", "got 2"), ("{epochs: 2}", "epochs is not a unit it counts"), ("'5 evals'", "got '5 evals'")],
)
def test_a_window_written_the_wrong_way_names_the_forms(window: str, words: str) -> None:
    text = f"name: x\nparams:\n  lr:\n    min: 0.001\n    max: 1\n    multipliers: [0.5]\n    cooldown: {window}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source="p.yaml")
    msg = str(err.value)
    assert "p.yaml:7: field `params.lr.cooldown`" in msg, msg
    assert "a window is written {evals: N}, {steps: N}, or both" in msg and words in msg, msg


def test_the_benchmark_policies_load_and_differ_from_their_preset_only_where_they_say() -> None:
    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "policies"
    no_settle = load_policy(folder / "lm-no-settle.yaml")
    lm = load_policy("lm")
    assert no_settle.limits.settle.evals == 0 and lm.limits.settle.evals == 3
    assert no_settle.params == lm.params and no_settle.limits.cooldown == lm.limits.cooldown
