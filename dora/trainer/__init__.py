"""Losses, advantage estimators and trainer backends: the consumer of batches and the producer of policy versions.

    trainer = Trainer(model, AlgorithmConfig(...), TrainerConfig(...))
    metrics = trainer.train_step(batch)          # one step = one published version
    weights = trainer.publish_weights()          # -> PolicyVersion(version, weights)
"""

from dora.trainer.advantages import ADVANTAGES, AdvantageOutput
from dora.trainer.backend import StepResult, TorchBackend, TrainerBackend
from dora.trainer.config import AlgorithmConfig, Aggregation, KLEstimator, LRSchedule, OffPolicy, TrainerConfig
from dora.trainer.logprobs import chunked_logprobs
from dora.trainer.losses import LOSSES, LossInputs, LossOutput
from dora.trainer.trainer import Trainer, TrainMetrics
from dora.trainer.value_head import ValueHead

__all__ = [
    "ADVANTAGES", "LOSSES", "AdvantageOutput", "Aggregation", "AlgorithmConfig", "KLEstimator", "LRSchedule",
    "LossInputs", "LossOutput", "OffPolicy", "StepResult", "TorchBackend", "TrainMetrics", "Trainer",
    "TrainerBackend", "TrainerConfig", "ValueHead", "chunked_logprobs",
]
