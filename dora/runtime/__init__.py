"""Wiring of the stages: inline (one process) and Ray (one machine or a cluster)."""
