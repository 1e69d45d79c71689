"""Datasets, tokenizers and the resumable PromptSource: the first stage of the flow (dataset -> PromptSource -> RolloutPool)."""
