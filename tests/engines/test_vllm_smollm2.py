"""vLLM and dora's torch engine on a real small model, SmolLM2-135M-Instruct (`make smollm2`; run by
`make test-vllm`): the same greedy tokens for chat prompts, and behavior log-probs within 2e-3 (float32
on the CPU with different kernels; logits of magnitude ~40)."""

import asyncio

import pytest
import torch

from dora.data.tokenizer import load_tokenizer
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.io import load_model
from dora.runtime.components import REPO_ROOT
from dora.types import PromptGroup, SamplingParams

FOLDER = REPO_ROOT / "models" / "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (FOLDER / "config.json").is_file(),
                       reason=f"{FOLDER} is absent: `make smollm2` converts SmolLM2-135M-Instruct"),
]

QUESTIONS = [
    "Sara has 3 boxes of 12 apples. She eats 5 apples. How many apples are left?",
    "What is the capital of France?",
    "Write one sentence about the sea.",
]
ENGINE = dict(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=256)


def test_vllm_and_the_torch_engine_agree_on_smollm2():
    from dora.engines.vllm_engine import VllmEngine

    model, tokenizer = load_model(FOLDER).eval(), load_tokenizer(FOLDER)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(q)) for q in QUESTIONS]
    sampling = SamplingParams(max_new_tokens=32, temperature=0, stop_token_ids=(tokenizer.eos_token_id,))
    groups = [PromptGroup(group_id=i, prompt_id=i, prompt_ids=p) for i, p in enumerate(prompts)]

    torch_engine = TorchEngine(model.config, EngineConfig(**ENGINE))
    torch_engine.add_version(0, model.state_dict())
    for g in groups:
        torch_engine.submit(g, 0, sampling)
    expected = []
    while torch_engine.has_work():
        expected.extend(torch_engine.step())

    engine = VllmEngine(FOLDER, EngineConfig(kind="vllm", max_live_versions=1, **ENGINE), model.config)
    try:
        engine.add_version(0, model.state_dict())
        for g in groups:
            engine.submit(g, 0, sampling)

        async def take():
            out = []
            async for traj in engine.finished():
                out.append(traj)
                if len(out) == len(groups):
                    return out
        got = asyncio.run(asyncio.wait_for(take(), 300))
    finally:
        engine.close()
    by_prompt = {t.prompt_id: t for t in got}
    for ref in sorted(expected, key=lambda t: t.prompt_id):
        ours = by_prompt[ref.prompt_id]
        assert ours.response_ids == ref.response_ids, tokenizer.decode(ref.response_ids)
        assert ours.finish_reason is ref.finish_reason
        torch.testing.assert_close(ours.behavior_logprobs, ref.behavior_logprobs, atol=2e-3, rtol=0)
