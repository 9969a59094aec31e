"""Manipulation workload: a two-link MuJoCo arm reaching around an obstacle, trained with SB3 PPO."""
