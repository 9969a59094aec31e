"""Which metric keys the daemon reads: those the policy maps. The roles resolved from them alone are
the ones resolved from every key the run has, for the bundled presets and the key names real
training scripts log (Hugging Face Trainer, Lightning, Stable-Baselines3, CleanRL) mixed with the
keys no role reads (learning rate, epoch, throughput, memory, per-layer norms)."""

from __future__ import annotations

import functools
import random

import pytest

from atm.policies import AUX_ROLES, load_policy, preset_names
from atm.watcher.poll import keys_to_read
from atm.watcher.snapshot import build_snapshot, resolve_roles

HF_TRAINER = ["loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "eval_runtime", "eval_samples_per_second",
              "eval_steps_per_second", "train_loss", "train_runtime", "train_samples_per_second",
              "train_steps_per_second", "total_flos"]
LIGHTNING = ["train_loss_step", "train_loss_epoch", "train/loss_ce", "train/loss_aux", "val_loss", "val/acc", "epoch",
             "lr-AdamW", "loss/ce", "loss/kl", "loss/val", "trainer/global_step"]
SB3 = ["rollout/ep_rew_mean", "rollout/ep_len_mean", "rollout/success_rate", "eval/mean_reward", "eval/mean_ep_length",
       "time/fps", "time/iterations", "time/time_elapsed", "time/total_timesteps", "train/approx_kl",
       "train/clip_fraction", "train/clip_range", "train/entropy_loss", "train/explained_variance",
       "train/learning_rate", "train/loss", "train/n_updates", "train/policy_gradient_loss", "train/std",
       "train/value_loss"]
CLEANRL = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS", "losses/value_loss",
           "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance"]
NOISE = ["lr", "epoch", "step_time", "throughput/tokens_per_s", "throughput/samples_per_s", "memory/allocated_gb",
         "memory/reserved_gb", "grad_norm/total", *(f"grad_norm/layer_{i}" for i in range(12)),
         *(f"weights/layer_{i}/norm" for i in range(12)), "atm/lr", "atm/dropout"]
MIXES = {"hf_trainer": HF_TRAINER, "lightning": LIGHTNING, "sb3": SB3, "cleanrl": CLEANRL}


policy_named = functools.cache(load_policy)


def _read(policy_name: str, keys: list[str]) -> list[str]:
    """What a poll reads: the keys picked, and the listener's atm/* (read anyway)."""
    picked = keys_to_read(policy_named(policy_name), keys)
    return sorted(k for k in keys if k in picked or k.startswith("atm/"))


@pytest.mark.parametrize("policy_name", preset_names())
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_the_keys_read_resolve_to_the_roles_of_every_key(policy_name: str, mix: str) -> None:
    policy = policy_named(policy_name)
    keys = [*MIXES[mix], *NOISE]
    read = _read(policy_name, keys)
    assert resolve_roles(policy, read) == resolve_roles(policy, keys)
    assert len(read) < len(keys) / 2, f"{policy_name} on {mix}: reads {read}"


def test_what_is_read_of_common_scripts() -> None:
    # The job's own lr comes first for the lr role (learning_rate too, were lr not logged).
    assert _read("lm", [*HF_TRAINER, *NOISE]) == ["atm/dropout", "atm/lr", "eval_loss", "grad_norm", "lr", "train_loss"]
    assert _read("lm", HF_TRAINER) == ["eval_loss", "grad_norm", "learning_rate", "train_loss"]
    # Lightning: loss/* and train/loss_* are loss components (loss/val too, as val_loss is logged).
    assert _read("lm", [*LIGHTNING, *NOISE]) == [
        "atm/dropout", "atm/lr", "grad_norm/total", "loss/ce", "loss/kl", "loss/val", "lr", "train/loss_aux",
        "train/loss_ce", "train_loss_epoch", "val_loss"]
    assert _read("rl-ppo", [*SB3, *NOISE]) == [
        "atm/dropout", "atm/lr", "eval/mean_ep_length", "eval/mean_reward", "rollout/success_rate", "train/approx_kl",
        "train/clip_fraction", "train/entropy_loss", "train/explained_variance", "train/std", "train/value_loss"]


@pytest.mark.parametrize("policy_name", preset_names())
def test_any_mix_of_the_keys_resolves_alike(policy_name: str) -> None:
    # A run's keys come and go in any combination (an evaluation metric shows up late, a script logs
    # two frameworks' names): whatever the mix, the keys read give the roles every key gives.
    policy = policy_named(policy_name)
    pool = sorted({*HF_TRAINER, *LIGHTNING, *SB3, *CLEANRL, *NOISE})
    rng = random.Random(7)
    for _ in range(300):
        keys = rng.sample(pool, rng.randint(1, len(pool)))
        every = resolve_roles(policy, keys)
        if all(role in AUX_ROLES for role in every):
            # Only the run's settings map (its lr): nothing to judge, so they are not read (but for the
            # listener's atm/*, read anyway).
            every = {role: key for role, key in every.items() if key.startswith("atm/")}
        assert resolve_roles(policy, _read(policy_name, keys)) == every, sorted(keys)


def test_a_run_none_of_whose_keys_maps_has_one_read_for_its_progress() -> None:
    lm = load_policy("lm")
    assert keys_to_read(lm, ["throughput", "atm/lr", "epoch", "accuracy"]) == {"accuracy"}
    assert keys_to_read(lm, ["atm/lr"]) == frozenset()
    assert keys_to_read(lm, []) == frozenset()


@pytest.mark.parametrize(("policy_name", "mix"), [("lm", "hf_trainer"), ("lm", "lightning"), ("rl-ppo", "sb3")])
def test_the_snapshot_of_the_keys_read_is_the_snapshot_of_every_key(policy_name: str, mix: str) -> None:
    policy = policy_named(policy_name)
    keys = [*MIXES[mix], *NOISE]
    # Every key logged at every 10th step, each with its own curve; the unread ones log further.
    history = {k: [(s, 1.0 + i / 100 + 1.0 / (s + 1)) for s in range(0, 400, 10)] for i, k in enumerate(keys)}
    read = {k: history[k] for k in _read(policy_name, keys)}
    whole = build_snapshot("r", policy, history, {"lr": 1e-3}, now=0.0)
    assert whole.series, "the mix maps roles"
    assert build_snapshot("r", policy, read, {"lr": 1e-3}, now=0.0) == whole
