"""A short run of the Ray runtime with real actors: two engine actors and a trainer actor on a local
Ray cluster, weights over the shared-memory channel (one run for the module: 30-45 s on a busy 2-core machine)."""

import json
import os

import pytest
import ray
import torch

from dora.cli import compose_config
from dora.data.tokenizer import CharTokenizer
from dora.models.config import ModelConfig
from dora.models.io import load_state_dict
from dora.models.model import DecoderLM
from dora.runtime.ray_runtime import (
    PublishedMarker,
    RayEngineProxy,
    ray_sync_config,
    train_ray,
)
from dora.telemetry.metrics import read_jsonl

STEPS, K, ENGINES = 3, 1, 2
SMALL = ["model=tiny_random", "rollout.batch_groups=2", "rollout.group_size=4", "sampling.max_new_tokens=16",
         "eval.num_prompts=8", "eval.max_new_tokens=8", "logging.wandb=false", "logging.progress=false",
         "trainer.lr=1e-3", "data.train_size=200", "data.eval_size=8", "engine.max_model_len=64"]


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    if ray.is_initialized():  # another module's cluster: this test checks its own start and teardown
        ray.shutdown()
    run_dir = tmp_path_factory.mktemp("ray") / "run"
    cfg = compose_config("grpo_tiny", [
        "runtime=ray", *SMALL, f"steps={STEPS}", f"rollout.max_staleness={K}", f"runtime.num_engines={ENGINES}",
        "runtime.ray_engine_cpus=0.5", "runtime.ray_trainer_cpus=0.5", f"logging.run_dir={run_dir}",
        # A random model rarely earns a reward, so GRPO's advantages (and gradient) can all be zero;
        # the entropy bonus makes every step move the parameters.
        "algorithm.entropy_coef=0.01"])
    summary = train_ray(cfg, run_dir)
    return cfg, run_dir, summary


def test_ray_run_trains_with_bounded_staleness(ray_run):
    cfg, run_dir, summary = ray_run
    rows = read_jsonl(summary.metrics_path)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["version"] for r in rows] == list(range(STEPS))
    assert all(0 <= r["staleness_max"] <= K for r in rows)
    assert all(s <= K for s in summary.staleness)
    trained = [p for r in rows for p in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == STEPS * cfg.rollout.batch_groups
    assert rows[-1]["trained_tokens"] == summary.trained_tokens > 0
    assert "eval_accuracy" in rows[-1]

    # The trainer actor's checkpoint differs from the initial weights: the steps trained the model.
    final = load_state_dict(run_dir / "checkpoints" / f"step_{STEPS}" / "model")
    tokenizer = CharTokenizer()
    start = DecoderLM.from_config(ModelConfig.tiny(vocab_size=tokenizer.vocab_size).with_tokenizer(tokenizer),
                                  seed=cfg.model.seed).state_dict()
    assert final.keys() == start.keys()
    assert any(not torch.equal(final[k], start[k]) for k in start), "no parameter changed"


def test_every_version_reached_every_engine_over_the_channel(ray_run):
    _, run_dir, summary = ray_run
    report = json.loads((run_dir / "ray_runtime.json").read_text())
    assert report == summary.extra["ray"]
    assert report["sync_channel"] == "shm" and report["cluster"] == "local"
    assert len(report["publish_s"]) == STEPS + 1  # version 0, then one per step
    for engine in map(str, range(ENGINES)):
        received = report["engine_received"][engine]
        assert received == sorted(set(received)), "versions only increase"
        assert set(range(STEPS)) <= set(received), f"engine {engine} missed a version: {received}"
        assert "0" in report["engine_load_s"][engine]
    # Every group an engine ran was on a version that engine had loaded.
    timeline = json.loads((run_dir / "timeline.json").read_text())
    groups = [e for e in timeline["traceEvents"] if e["ph"] == "X" and e["cat"].startswith("engine ")]
    assert groups
    for event in groups:
        engine = event["cat"].removeprefix("engine ")
        assert str(event["args"]["version"]) in report["engine_load_s"][engine], event


def test_everything_is_torn_down(ray_run):
    *_, summary = ray_run
    assert not ray.is_initialized()
    name = summary.extra["ray"]["sync_name"]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(name)]


def test_sync_config_for_ray_and_bad_marker():
    local = compose_config("grpo_tiny", ["runtime=ray"])
    cluster = compose_config("grpo_tiny", ["runtime=ray", "runtime.ray_address=auto"])
    assert ray_sync_config(local).channel == "shm" and ray_sync_config(cluster).channel == "ray"
    assert ray_sync_config(local).name != ray_sync_config(local).name  # two runs never share segments
    assert ray_sync_config(compose_config("grpo_tiny", ["runtime=ray", "sync=ray"])).channel == "ray"
    proxy = RayEngineProxy(actor=None, engine_id=0, max_live_versions=2, timeout_s=1.0)
    with pytest.raises(TypeError, match="PublishedMarker of version 3"):
        proxy.add_version(3, {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="version 3"):
        proxy.add_version(3, PublishedMarker(2, "shm", 0))
    assert len(PublishedMarker(2, "shm", 0)) == 0


def test_more_cpus_than_the_machine_fails_before_starting_ray(tmp_path):
    cfg = compose_config("grpo_tiny", ["runtime=ray", "runtime.num_engines=2", "runtime.ray_engine_cpus=64",
                                       f"logging.run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"runtime.ray_engine_cpus=64.0 \+ runtime.ray_trainer_cpus"):
        train_ray(cfg, tmp_path)
    assert not ray.is_initialized()
