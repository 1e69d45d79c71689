"""The Ray runtime's engine actor class, driven directly in this process (no Ray cluster): weights
arrive over a real shared-memory channel while sequences decode, staged versions become live on
request, commands apply in the driver's order, and bad requests fail naming the version."""

import threading
import uuid

import pytest
import torch

from dora.data.tokenizer import CharTokenizer
from dora.engines.config import EngineConfig
from dora.models.config import ModelConfig
from dora.models.model import DecoderLM
from dora.runtime.ray_actors import MAX_STAGED, EngineActor
from dora.sync.base import SyncConfig, SyncRole, SyncTimeout, build_channel
from dora.types import FinishReason, PromptGroup, SamplingParams

LONG = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7)  # no stop tokens: always 40 tokens


@pytest.fixture
def setup():
    torch.manual_seed(0)
    tokenizer = CharTokenizer()
    model_cfg = ModelConfig.tiny(vocab_size=tokenizer.vocab_size).with_tokenizer(tokenizer)
    model = DecoderLM.from_config(model_cfg, seed=0)
    sync = SyncConfig(channel="shm", name=f"dora-test-actor-{uuid.uuid4().hex[:8]}", timeout_s=5.0)
    writer = build_channel(sync, SyncRole.writer)
    actor = EngineActor(EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64,
                                          max_live_versions=2, engine_id=3), sync, num_threads=1)
    actor.build(model.config)
    yield actor, writer, model
    actor.close()
    writer.close()


def weights(model, scale=0.0):
    return {k: v + scale for k, v in model.state_dict().items()}


def group(gid, n=2):
    return PromptGroup(group_id=gid, prompt_id=gid, prompt_ids=[5, 6, 7, 8], num_samples=n)


def test_a_version_arrives_and_goes_live_while_sequences_of_the_old_one_decode(setup):
    actor, writer, model = setup
    writer.publish(0, weights(model))
    actor.add_version(0)  # waits for the receiver to stage version 0
    actor.command(0, "submit", (group(1), 0, LONG))
    engine = actor.engine
    for _ in range(3):
        engine.step()
    assert engine.stats().running_per_version == {0: 2}

    writer.publish(1, weights(model, 0.01))
    assert actor.wait_received(1, 5.0) == 1
    actor.add_version(1)
    stats = engine.stats()
    assert stats.live_versions == [0, 1] and stats.running_per_version == {0: 2}, "sequences of v0 kept going"
    done = []
    while engine.has_work():
        done += engine.step()
    assert [t.version for t in done] == [0, 0] and all(t.num_tokens == 40 for t in done)
    # Version 0's staging buffer went back to the channel when version 1 arrived; 1's waits for 2.
    assert actor._staged == {} and actor._to_release == [1]


def test_commands_apply_in_sequence_order_and_errors_surface(setup):
    actor, writer, model = setup
    writer.publish(0, weights(model))
    actor.add_version(0)
    actor.command(1, "abort", (1,))  # arrives before the submit it follows: waits for it
    assert actor.engine.stats().waiting == 0
    actor.command(0, "submit", (group(1), 0, LONG))
    done = []
    while actor.engine.has_work():
        done += actor.engine.step()
    assert {t.finish_reason for t in done} == {FinishReason.ABORT}
    with pytest.raises(ValueError, match="version 5"):
        actor.command(2, "submit", (group(2), 5, LONG))  # version 5 is not live
    with pytest.raises(ValueError, match="unknown command"):
        actor.command(3, "add_version", (1,))


def test_stream_through_poll_finished_until_close(setup):
    actor, writer, model = setup
    writer.publish(0, weights(model))
    actor.add_version(0)
    actor.start()
    actor.command(0, "submit", (group(1, n=3), 0, SamplingParams(max_new_tokens=5, seed=1)))
    got = []
    for _ in range(100):  # each call waits up to 1 s; the group needs a few ms
        trajectories, stats, ended = actor.poll_finished(1.0)
        got += trajectories
        if len(got) == 3:
            break
    assert sorted(t.sample_idx for t in got) == [0, 1, 2] and not ended
    assert stats.num_generated_tokens == 15
    actor.engine.close()
    trajectories, _, ended = actor.poll_finished(5.0)
    assert trajectories == [] and ended


def test_loading_a_skipped_or_missing_version_fails_naming_it(setup):
    actor, writer, model = setup
    for version in range(MAX_STAGED + 2):
        writer.publish(version, weights(model, version * 0.01))
        actor.wait_received(version, 5.0)
    assert sorted(actor._staged) == list(range(2, MAX_STAGED + 2)), "only the newest versions stay staged"
    with pytest.raises(ValueError, match="asked to load version 0"):
        actor.add_version(0)
    actor.sync.timeout_s = 0.2
    with pytest.raises(SyncTimeout, match="version 9 to arrive at engine 3"):
        actor.add_version(9)
    with pytest.raises(SyncTimeout, match="engine 3 to receive version 9"):
        actor.wait_received(9, 0.2)


def test_a_load_waits_for_the_drop_the_driver_sent_before_it(setup):
    actor, writer, model = setup
    for version in range(3):
        writer.publish(version, weights(model, version * 0.01))
        actor.wait_received(version, 5.0)
        if version < 2:
            actor.add_version(version)
    errors = []

    def load():  # the driver sent drop_version(0) (command 0) before asking for version 2
        try:
            actor.add_version(2, after_commands=1)
        except Exception as e:
            errors.append(e)

    loader = threading.Thread(target=load)
    loader.start()
    loader.join(0.3)
    assert loader.is_alive(), "the load must wait for the drop sent before it"
    actor.command(0, "drop_version", (0,))
    loader.join(10.0)
    assert not loader.is_alive() and errors == []
    assert actor.engine.live_versions == [1, 2]
