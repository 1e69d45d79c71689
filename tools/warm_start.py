"""Produce the tiny recipe's warm-start checkpoint: a short supervised phase on a sloppy teacher.

RL needs a policy that sometimes succeeds and has room to improve. This script trains the tiny MoE
(char tokenizer) with next-token cross-entropy on the arithmetic task's scratchpads written by a
*sloppy teacher*: at every column where a carry comes in, the teacher forgets it with probability
`--carry-slip` (and carries on consistently from its wrong sum). The model so learns the whole
procedure but not that a carry must always be added: its greedy answers are wrong on most problems
with carries, while its samples sometimes carry. GRPO then has to discover from the reward alone —
the teacher never showed carrying more often than forgetting — that carrying is what pays.
(A warm start on the exact reference solutions instead learns the task by imitation; RL then
mostly refines column look-ups, which is slow at this model size.)

It saves a Hugging Face-layout model folder (config.json + safetensors + tokenizer) and prints the
held-out greedy accuracy. Deterministic for a seed and thread count:

    python tools/warm_start.py --out assets/tiny_arith --steps 400 --carry-slip 0.6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dora.data.config import DataConfig
from dora.data.datasets import build_dataset
from dora.data.prompt_source import PromptSource
from dora.data.tasks import ANSWER_MARK, STEP_SEP, reference_solution
from dora.data.tokenizer import CharTokenizer
from dora.models.config import ModelConfig
from dora.models.io import save_model
from dora.models.model import DecoderLM
from dora.runtime.evaluate import greedy_accuracy


def sloppy_solution(row, rng: random.Random, carry_slip: float) -> str:
    """The scratchpad of `a+b` by a teacher who forgets an incoming carry with probability
    `carry_slip` and continues consistently from the wrong column sum (its answer is then wrong)."""
    if row.meta.get("op") != "+" or carry_slip == 0:
        return reference_solution(row)
    digits_a = [int(c) for c in reversed(str(row.meta["a"]))]
    digits_b = [int(c) for c in reversed(str(row.meta["b"]))]
    width = max(len(digits_a), len(digits_b))
    digits_a += [0] * (width - len(digits_a))
    digits_b += [0] * (width - len(digits_b))
    steps, out, carry = [], [], 0
    for x, y in zip(digits_a, digits_b):
        if carry and rng.random() < carry_slip:
            carry = 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        out.append(total % 10)
        carry = total // 10
    answer = int(str(carry) + "".join(str(d) for d in reversed(out)))
    return STEP_SEP.join(steps) + ANSWER_MARK + str(answer)


def sft_batch(rows, tokenizer: CharTokenizer, rng: random.Random, batch_size: int, carry_slip: float):
    """Right-padded [B, S] inputs/targets; the loss covers response tokens and the final EOS."""
    picked = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
    seqs, prompt_lens = [], []
    for row in picked:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(row.prompt)]
        response = tokenizer.encode(sloppy_solution(row, rng, carry_slip)) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        prompt_lens.append(len(prompt))
    S = max(map(len, seqs)) - 1
    input_ids_BS = torch.full((batch_size, S), tokenizer.pad_token_id, dtype=torch.long)
    targets_BS = torch.full((batch_size, S), -100, dtype=torch.long)
    mask_BS = torch.zeros(batch_size, S, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        n = len(seq) - 1
        input_ids_BS[i, :n] = torch.tensor(seq[:-1])
        mask_BS[i, :n] = 1
        targets_BS[i, p - 1:n] = torch.tensor(seq[p:])
    return input_ids_BS, mask_BS, targets_BS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/tiny_arith"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--carry-slip", type=float, default=0.6,
                        help="probability that the teacher forgets an incoming carry (0 = exact solutions)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    parser.add_argument("--snapshots", default="", help="comma-separated earlier steps to also evaluate and save "
                        "(as OUT-stepN), to choose how far the warm start goes")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = CharTokenizer()
    data_cfg = DataConfig(source="arithmetic", seed=args.seed)
    splits = build_dataset(data_cfg)
    model_cfg = ModelConfig.tiny(vocab_size=tokenizer.vocab_size).with_tokenizer(tokenizer)
    model = DecoderLM.from_config(model_cfg, seed=args.seed)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters; train rows {len(splits.train)}, "
          f"held-out {len(splits.eval)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = random.Random(args.seed)
    snapshots = {int(s) for s in args.snapshots.split(",") if s}
    eval_groups = PromptSource(data_cfg, tokenizer, dataset=splits).eval_groups()

    def finish(out: Path, steps: int) -> float:
        model.eval()
        accuracy = greedy_accuracy(model, tokenizer, eval_groups, reward="arithmetic",
                                   max_new_tokens=args.eval_max_new_tokens)
        model.train()
        save_model(model, out, tokenizer=tokenizer)
        info = {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "carry_slip": args.carry_slip,
                "heldout_greedy_accuracy": accuracy, "parameters": model.num_parameters(),
                "command": f"python tools/warm_start.py --out {out} --steps {steps} --carry-slip {args.carry_slip} "
                           f"--seed {args.seed} --threads {args.threads}"}
        (out / "warm_start.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"step {steps}: held-out greedy accuracy {accuracy:.3f}; saved {out}", flush=True)
        return accuracy

    start = time.monotonic()
    for step in range(args.steps):
        input_ids_BS, mask_BS, targets_BS = sft_batch(splits.train, tokenizer, rng, args.batch_size, args.carry_slip)
        logits_BSV = model(input_ids_BS, attention_mask_BS=mask_BS).logits_BSV
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.monotonic() - start:.0f}s)", flush=True)
        if step + 1 in snapshots and step + 1 != args.steps:
            finish(args.out.with_name(f"{args.out.name}-step{step + 1}"), step + 1)

    finish(args.out, args.steps)


if __name__ == "__main__":
    main()
