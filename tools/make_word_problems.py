"""Write the generated GSM8K-style word problems (dora/data/word_problems.py) as jsonl files.

    python tools/make_word_problems.py --out assets/word_problems --train 2000 --test 200 --seed 0

writes `train.jsonl` and `test.jsonl` (one `{"question", "answer"}` object per line, as GSM8K's
files) and `meta.json` (counts, seed and this command). The committed files are this command's
output; tests/test_word_problems.py checks that they still are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dora.data.word_problems import generate


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000, help="training rows")
    parser.add_argument("--test", type=int, default=200, help="test rows (no question shared with training)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = generate(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    command = (f"python tools/make_word_problems.py --out {args.out.as_posix()} --train {args.train} "
               f"--test {args.test} --seed {args.seed}")
    meta = {"train": len(train), "test": len(test), "seed": args.seed, "command": command}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
