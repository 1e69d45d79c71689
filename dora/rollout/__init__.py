"""Admission and scheduling of prompt groups across engines and policy versions (VersionController, RolloutPool)."""
