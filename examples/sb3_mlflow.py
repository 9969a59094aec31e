"""A Stable-Baselines3 PPO job on CartPole-v1 that logs to MLflow, managed by atm.

SB3's logger writes to stdout (and CSV or TensorBoard), not to MLflow, and atm decides on what the run
logs: an output format sends SB3's own rows (``rollout/ep_rew_mean``, ``train/approx_kl``, ...) to the
run, and an evaluation callback logs ``eval/mean_reward``. atm is the lines marked ``# atm``: updates
apply between rollouts (learning rate, entropy bonus, clip range, epochs)::

    python examples/sb3_mlflow.py --timesteps 100000
    atm-watch --backend mlflow --run <run_id> --policy examples/sb3_policy.yaml

Prints the run id first. ``--tracking-uri`` defaults to ``sqlite:///examples-mlflow.db``.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger

import atm  # atm


class MLflowOutput(KVWriter):
    """SB3's rows to the active MLflow run: the numbers only (SB3 also logs strings, such as the time)."""

    def write(self, key_values, key_excluded, step=0):
        atm.log_metrics(key_values, step=step)  # atm: numpy scalars included, strings left out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timesteps", type=int, default=100_000)
    p.add_argument("--n-steps", type=int, default=256, help="steps per environment per rollout")
    p.add_argument("--eval-every", type=int, default=5_000, help="environment steps between evaluations")
    p.add_argument("--tracking-uri", default="sqlite:///examples-mlflow.db")
    p.add_argument("--experiment", default="sb3-mlflow")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # networks this small run fastest on one thread (several spin on a busy CPU)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run() as run:
        print(f"run_id {run.info.run_id}", flush=True)
        env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
        model = PPO("MlpPolicy", env, n_steps=args.n_steps, batch_size=256, n_epochs=4, ent_coef=0.0,
                    seed=0, device="cpu", verbose=0)
        model.set_logger(Logger(None, [HumanOutputFormat(sys.stdout), MLflowOutput()]))
        evaluate = EvalCallback(make_vec_env("CartPole-v1", n_envs=1, seed=100), n_eval_episodes=3,
                                eval_freq=max(1, args.eval_every // 4), verbose=0)  # logs eval/mean_reward
        model.learn(args.timesteps, callback=[evaluate, atm.sb3_callback()])  # atm: stops when asked to


if __name__ == "__main__":
    main()
