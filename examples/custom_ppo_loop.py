"""A custom PPO trainer (no Stable-Baselines3) on CartPole-v1, managed by atm.

The shape of a hand-written RL trainer: its own frozen ``Recipe`` that it re-applies to its two Adam
optimizers at every update (so a change made to an optimizer would be undone at the next update),
a schedule that rebinds ``self.recipe`` (an entropy bonus that decays), reward weights in a dict
(a penalty when the pole falls, a scale on the reward for staying up), and metrics logged with
``step=update``. ``--actor-lr 1e-5`` makes a recipe that stalls, for the manager to mend.

atm is the lines marked ``# atm``: knobs on the recipe and the reward weights by path (re-read at
every use, so the rebinding does not lose them), applied at the top of each update, before the
rollout the decision is about::

    python examples/custom_ppo_loop.py --updates 200
    atm-watch --backend mlflow --run <run_id> --policy examples/custom_ppo_policy.yaml

Prints the run id first. ``--tracking-uri`` defaults to ``sqlite:///examples-mlflow.db``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import gymnasium as gym
import mlflow
import numpy as np
import torch
import torch.nn as nn

import atm  # atm


@dataclasses.dataclass(frozen=True)
class Recipe:
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    ent_coef: float = 0.01
    ent_decay: float = 0.995  # the entropy bonus shrinks a little every update
    clip_range: float = 0.2
    n_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    minibatch: int = 64


def mlp(n_in: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_out))


class Trainer:
    def __init__(self, recipe: Recipe, n_steps: int, seed: int) -> None:
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # networks this small run fastest on one thread (several spin on a busy CPU)
        self.recipe = recipe
        self.reward = {"collision_penalty": 1.0, "progress_scale": 1.0}
        self.env = gym.make("CartPole-v1")
        self.obs, _ = self.env.reset(seed=seed)
        n_obs, n_act = self.env.observation_space.shape[0], self.env.action_space.n
        self.actor, self.critic = mlp(n_obs, n_act), mlp(n_obs, 1)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=recipe.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=recipe.critic_lr)
        self.n_steps = n_steps
        self.episode_returns: list[float] = []
        self.episode_falls: list[bool] = []
        self._ret = 0.0

    def shaped(self, reward: float, fell: bool) -> float:
        return self.reward["progress_scale"] * reward - (self.reward["collision_penalty"] if fell else 0.0)

    def collect(self) -> dict[str, torch.Tensor]:
        obs, acts, logps, rews, dones, vals = [], [], [], [], [], []
        for _ in range(self.n_steps):
            o = torch.as_tensor(self.obs, dtype=torch.float32)
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=self.actor(o))
                a = dist.sample()
                v = self.critic(o).squeeze(-1)
            self.obs, r, terminated, truncated, _ = self.env.step(int(a))
            obs.append(o), acts.append(a), logps.append(dist.log_prob(a)), vals.append(v)
            rews.append(self.shaped(float(r), fell=terminated)), dones.append(terminated or truncated)
            self._ret += float(r)
            if terminated or truncated:
                self.episode_returns.append(self._ret)
                self.episode_falls.append(bool(terminated))
                self._ret = 0.0
                self.obs, _ = self.env.reset()
        with torch.no_grad():
            last = self.critic(torch.as_tensor(self.obs, dtype=torch.float32)).squeeze(-1)
        adv, gae = torch.zeros(self.n_steps), 0.0
        for t in reversed(range(self.n_steps)):
            nxt = last if t == self.n_steps - 1 else vals[t + 1]
            delta = rews[t] + self.recipe.gamma * nxt * (1 - dones[t]) - vals[t]
            gae = delta + self.recipe.gamma * self.recipe.gae_lambda * (1 - dones[t]) * gae
            adv[t] = gae
        values = torch.stack(vals)
        return {"obs": torch.stack(obs), "acts": torch.stack(acts), "logps": torch.stack(logps),
                "adv": adv, "returns": adv + values}

    def train(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        r = self.recipe
        # The recipe is the source of truth: re-applied to the optimizers at every update.
        for g in self.actor_opt.param_groups:
            g["lr"] = r.actor_lr
        for g in self.critic_opt.param_groups:
            g["lr"] = r.critic_lr
        adv = (batch["adv"] - batch["adv"].mean()) / (batch["adv"].std() + 1e-8)
        stats: dict[str, list[float]] = {"approx_kl": [], "clip_fraction": [], "entropy": [], "value_loss": []}
        for _ in range(r.n_epochs):
            for idx in torch.randperm(self.n_steps).split(r.minibatch):
                dist = torch.distributions.Categorical(logits=self.actor(batch["obs"][idx]))
                logp = dist.log_prob(batch["acts"][idx])
                ratio = (logp - batch["logps"][idx]).exp()
                clipped = ratio.clamp(1 - r.clip_range, 1 + r.clip_range)
                entropy = dist.entropy().mean()
                policy_loss = -torch.min(ratio * adv[idx], clipped * adv[idx]).mean() - r.ent_coef * entropy
                self.actor_opt.zero_grad()
                policy_loss.backward()
                self.actor_opt.step()
                value_loss = (self.critic(batch["obs"][idx]).squeeze(-1) - batch["returns"][idx]).pow(2).mean()
                self.critic_opt.zero_grad()
                value_loss.backward()
                self.critic_opt.step()
                with torch.no_grad():
                    stats["approx_kl"].append(float(((ratio - 1) - (logp - batch["logps"][idx])).mean()))
                    stats["clip_fraction"].append(float(((ratio - 1).abs() > r.clip_range).float().mean()))
                stats["entropy"].append(float(entropy.detach()))
                stats["value_loss"].append(float(value_loss.detach()))
        # The schedule: a new recipe object with a smaller entropy bonus.
        self.recipe = dataclasses.replace(r, ent_coef=r.ent_coef * r.ent_decay)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def evaluate(self, episodes: int, seed: int) -> dict[str, float]:
        env = gym.make("CartPole-v1")
        returns, solved = [], []
        for i in range(episodes):
            o, _ = env.reset(seed=seed + i)
            total, done, truncated = 0.0, False, False
            while not (done or truncated):
                with torch.no_grad():
                    a = int(self.actor(torch.as_tensor(o, dtype=torch.float32)).argmax())
                o, rew, done, truncated, _ = env.step(a)
                total += float(rew)
            returns.append(total)
            solved.append(truncated and not done)
        return {"eval/return": float(np.mean(returns)), "eval/safe_success": float(np.mean(solved))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--n-steps", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--actor-lr", type=float, default=Recipe.actor_lr, help="the recipe's (1e-5 stalls: a case to manage)")
    p.add_argument("--tracking-uri", default="sqlite:///examples-mlflow.db")
    p.add_argument("--experiment", default="custom-ppo")
    args = p.parse_args(argv)

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    trainer = Trainer(Recipe(actor_lr=args.actor_lr), n_steps=args.n_steps, seed=args.seed)
    with mlflow.start_run() as run:
        print(f"run_id {run.info.run_id}", flush=True)
        mlflow.log_params(dataclasses.asdict(trainer.recipe))
        listener = atm.listen(  # atm
            knobs=atm.attrs(  # atm: names are the policy's params
                trainer, "reward.collision_penalty", "reward.progress_scale",
                lr="recipe.actor_lr", critic_lr="recipe.critic_lr", ent_coef="recipe.ent_coef",
                clip_range="recipe.clip_range", n_epochs="recipe.n_epochs",
            ),
            apply="manual",  # atm
        )
        start = time.time()
        for update in range(1, args.updates + 1):
            listener.apply_pending(step=update)  # atm: before the rollout the decision is about
            if listener.stop_requested:  # atm
                break
            batch = trainer.collect()
            stats = trainer.train(batch)
            row = {f"train/{k}": v for k, v in stats.items()}
            row["rollout/ep_rew_mean"] = float(np.mean(trainer.episode_returns[-20:] or [0.0]))
            row["rollout/fall_rate"] = float(np.mean(trainer.episode_falls[-20:] or [0.0]))
            # What the optimizers used this update, and the reward weights in force.
            row["charts/actor_lr"] = trainer.actor_opt.param_groups[0]["lr"]
            row["charts/critic_lr"] = trainer.critic_opt.param_groups[0]["lr"]
            row["charts/ent_coef"] = trainer.recipe.ent_coef
            row["charts/collision_penalty"] = trainer.reward["collision_penalty"]
            row["charts/sps"] = update * args.n_steps / (time.time() - start)
            if update % args.eval_every == 0:
                row.update(trainer.evaluate(args.eval_episodes, seed=10_000 + update))
            atm.log_metrics(row, step=update)  # atm: numbers only, to the active run
        listener.close()  # atm: flush the last acknowledgements


if __name__ == "__main__":
    main()
