"""Inference engines behind the Engine protocol: they sample groups on a given policy version and stream trajectories back."""
