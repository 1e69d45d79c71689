"""A real small model: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, 49k BPE vocab)
converted by `make smollm2`, in dora's `DecoderLM`, dora's torch engine and transformers.

Tolerance: both compute in float32 on the CPU with different operation orders (dora's ops, SDPA vs
transformers' attention); logits and log-probs agree to 1e-3 absolute on logits of magnitude ~40
(observed: bit-equal logits on transformers 5.23). Greedy tokens agree exactly.
"""

from __future__ import annotations

import pytest
import torch

from dora.data.tokenizer import load_tokenizer
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.io import load_model
from dora.runtime.components import REPO_ROOT
from dora.types import FinishReason, PromptGroup, SamplingParams

FOLDER = REPO_ROOT / "models" / "smollm2-135m-instruct"
ATOL = 1e-3

pytestmark = pytest.mark.skipif(not (FOLDER / "config.json").is_file(),
                                reason=f"{FOLDER} is absent: `make smollm2` converts SmolLM2-135M-Instruct")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Sara has 3 boxes of 12 apples. She eats 5 apples. How many apples are left?",
]


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    return hf, load_model(FOLDER).eval(), load_tokenizer(FOLDER)


def test_folder_is_smollm2(models):
    _, dora_model, tokenizer = models
    cfg = dora_model.config
    assert (cfg.model_type.value, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and dora_model.lm_head.weight is dora_model.model.embed_tokens.weight
    assert tokenizer.eos_token_id == 2 and cfg.eos_token_ids == [2]
    assert tokenizer.apply_chat_template("hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def test_logits_match_transformers(models):
    hf, dora_model, tokenizer = models
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt)]])
        expected = hf(ids).logits
        torch.testing.assert_close(dora_model(ids).logits_BSV, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(models):
    hf, dora_model, tokenizer = models
    num_new = 8
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt)]])
        expected = hf.generate(ids, max_new_tokens=num_new, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
        for _ in range(num_new):  # dora's model, one full forward per token
            ids = torch.cat([ids, dora_model(ids).logits_BSV[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, -num_new:].tolist() == expected.tolist(), prompt


@torch.no_grad()
def test_torch_engine_greedy_matches_transformers_on_a_chat_prompt(models):
    hf, dora_model, tokenizer = models
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(PROMPTS[2]))  # the template writes <|im_start|>
    num_new = 24
    expected = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=num_new, do_sample=False,
                           eos_token_id=tokenizer.eos_token_id)[0, len(prompt_ids):].tolist()
    engine = TorchEngine(dora_model.config, EngineConfig(max_num_seqs=2, max_model_len=128, max_num_batched_tokens=128))
    engine.add_version(0, dora_model.state_dict())
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompt_ids, num_samples=1), 0,
                  SamplingParams(max_new_tokens=num_new, temperature=0, stop_token_ids=(tokenizer.eos_token_id,)))
    finished = []
    while engine.has_work():
        finished.extend(engine.step())
    (trajectory,) = finished
    assert trajectory.response_ids == expected
    assert trajectory.finish_reason is (FinishReason.STOP if expected[-1] == tokenizer.eos_token_id
                                        else FinishReason.LENGTH)
    # The behavior log-probs the trainer will correct against: transformers' over the same tokens.
    full = torch.tensor([prompt_ids + expected[:-1]])
    logprobs = torch.log_softmax(hf(full).logits[0, len(prompt_ids) - 1:], -1)
    torch.testing.assert_close(trajectory.behavior_logprobs,
                               logprobs.gather(1, torch.tensor(expected)[:, None])[:, 0], atol=ATOL, rtol=0)
