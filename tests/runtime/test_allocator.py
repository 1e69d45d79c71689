"""glibc malloc tuning: a train step's freed memory stays mapped, so later steps stop page-faulting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dora.runtime import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")

# Train steps of a small MoE on a worker thread (as the inline runtime runs them), minor page faults
# counted per step on that thread. A fresh interpreter: the settings must come before threads start.
SCRIPT = """
import json, resource, sys, threading
sys.path.insert(0, {fixtures!r})
import torch
from dora.runtime.allocator import tune_malloc
applied = tune_malloc() if {tune} else None
from dora.trainer.config import AlgorithmConfig, TrainerConfig
from dora.trainer.trainer import Trainer
from trainer_fixtures import random_batch, tiny_model

torch.set_num_threads(1)
faults = []

def run():
    model = tiny_model(vocab_size=100, hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                       moe_intermediate_size=128, num_experts=8)
    trainer = Trainer(model, AlgorithmConfig(), TrainerConfig(max_tokens_per_microbatch=4096))
    batch = random_batch(model, seed=0, num_groups=16, group_size=8, max_prompt=20, max_response=90)
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        batch.advantages = None
        trainer.train_step(batch)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def _faults(tune: bool) -> dict:
    fixtures = str(Path(__file__).parents[1] / "trainer")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(fixtures=fixtures, tune=tune)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_train_steps_stop_page_faulting():
    result = _faults(tune=True)
    assert result["applied"] == {name: value for name, (_, value) in allocator.SETTINGS.items()}
    first, later = result["faults"][0], sorted(result["faults"][3:])
    # The first step maps its working set; afterwards the median step maps (almost) nothing new.
    assert first > 10_000
    assert later[len(later) // 2] < first * 0.005, result["faults"]


def test_tune_malloc_is_idempotent():
    assert allocator.tune_malloc() == allocator.tune_malloc() is not None
