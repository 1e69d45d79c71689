"""Losses, advantage estimators and trainer backends: the consumer of batches and the producer of policy versions."""
