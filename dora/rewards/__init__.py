"""Reward functions and the reward pool, run off the hot path between the engines and the trajectory buffer."""
