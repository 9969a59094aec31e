"""``atm.attrs``: knobs on a custom trainer's recipe and reward weights, by dotted path.

Shaped after the custom PPO trainer that took atm: a frozen recipe dataclass that the trainer
replaces (``self.recipe = dataclasses.replace(...)``) and re-applies to its optimizers at every
update, and reward weights in a dict. The tracker side is ``FakeChannel`` (the listener's logic is
what is tested; ``tests/examples`` runs the same shape against a real MLflow store).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest

import atm
from atm.testing import FakeChannel, wait_for


@dataclasses.dataclass(frozen=True)
class Recipe:
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    n_epochs: int = 4


class Trainer:
    def __init__(self) -> None:
        self.recipe = Recipe()
        self.reward = {"collision_penalty": 5.0, "progress_scale": 1.0}

    def anneal(self) -> None:
        # What the real trainer does between updates: a new recipe object, same values.
        self.recipe = dataclasses.replace(self.recipe)


def test_knobs_follow_the_path_to_the_object_the_trainer_has_now() -> None:
    trainer = Trainer()
    knobs = atm.attrs(trainer, "reward.collision_penalty", "recipe.n_epochs", lr="recipe.actor_lr")
    assert sorted(knobs) == ["lr", "recipe.n_epochs", "reward.collision_penalty"]
    trainer.anneal()  # rebinds self.recipe: the knob must not stay on the old object
    knobs["lr"].set(6e-4)
    assert trainer.recipe.actor_lr == 6e-4 and knobs["lr"].get() == 6e-4
    trainer.anneal()
    assert knobs["lr"].get() == 6e-4  # read from the new recipe too
    knobs["recipe.n_epochs"].set(6.0)
    assert trainer.recipe.n_epochs == 6 and isinstance(trainer.recipe.n_epochs, int)
    trainer.reward = dict(trainer.reward)  # a new dict of weights
    knobs["reward.collision_penalty"].set(10.0)
    assert trainer.reward["collision_penalty"] == 10.0


def test_a_mapping_names_knobs_a_keyword_cannot_spell() -> None:
    trainer = Trainer()
    knobs = atm.attrs(trainer, {"loss_weight.aux": "reward.progress_scale"}, "reward.collision_penalty")
    assert sorted(knobs) == ["loss_weight.aux", "reward.collision_penalty"]
    knobs["loss_weight.aux"].set(2.0)
    assert trainer.reward["progress_scale"] == 2.0
    with pytest.raises(ValueError, match=r"named twice"):
        atm.attrs(trainer, {"lr": "recipe.actor_lr"}, lr="recipe.critic_lr")


def test_a_named_tuple_and_plain_objects_on_the_path() -> None:
    class Weights(NamedTuple):
        collision: float

    class Env:
        weights = Weights(collision=1.0)

    holder = type("Holder", (), {})()
    holder.env = Env()
    knob = atm.attrs(holder, "env.weights.collision")["env.weights.collision"]
    knob.set(2.5)
    assert holder.env.weights == Weights(collision=2.5)


def test_mistakes_are_said_at_once_with_the_path() -> None:
    trainer = Trainer()
    with pytest.raises(AttributeError, match=r"'recipe.actor_lrr': recipe \(Recipe\) has no attribute 'actor_lrr'"):
        atm.attrs(trainer, "recipe.actor_lrr")
    with pytest.raises(KeyError, match=r"reward has no key 'collision'"):
        atm.attrs(trainer, "reward.collision")
    with pytest.raises(TypeError, match=r"not a number"):
        atm.attrs(trainer, "reward")
    with pytest.raises(ValueError, match=r"named twice"):
        atm.attrs(trainer, "recipe.actor_lr", **{"recipe.actor_lr": "recipe.critic_lr"})
    with pytest.raises(ValueError, match=r"not a dotted path"):
        atm.attrs(trainer, "recipe..actor_lr")


def test_an_update_reaches_the_rebound_recipe_at_the_update_boundary() -> None:
    trainer = Trainer()
    ch = FakeChannel()
    lst = atm.listen(knobs=atm.attrs(trainer, "reward.collision_penalty", lr="recipe.actor_lr"),
                     apply="manual", channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: ch.infos)
        assert ch.infos[0].values == {"lr": 3e-4, "reward.collision_penalty": 5.0}
        ch.publish(1, lr=(3e-4, 1.5e-4), **{"reward.collision_penalty": (5.0, 10.0)})
        wait_for(lambda: lst._pending)
        trainer.anneal()
        lst.apply_pending(step=7)
        assert trainer.recipe.actor_lr == pytest.approx(1.5e-4) and trainer.reward["collision_penalty"] == 10.0
        trainer.anneal()
        assert trainer.recipe.actor_lr == pytest.approx(1.5e-4)  # held across the next update
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].status == "applied" and ch.acks[1].values["lr"] == pytest.approx(1.5e-4)
    finally:
        lst.close()
