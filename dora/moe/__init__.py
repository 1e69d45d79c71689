"""MoE routing record/replay and the replay-guided expert balancer."""
