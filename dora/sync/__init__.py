"""Weight-sync channels that carry published policy versions from the trainer to the engines."""
