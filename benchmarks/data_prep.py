"""Data preparation speed: ours vs TRL's own, side by side in one run, on the same conversations.

Ours: `mistral_fast.dataset.prepare_data` — read the file, validate every record, apply the exact chat
template, tokenise, build assistant-only labels, split. TRL: `SFTTrainer._prepare_dataset` with
``assistant_only_loss=True`` on the same `messages` (template + tokenise + assistant mask + truncation),
given our tokenizer so both produce the same ids; the script checks that they do.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_prep.py [--repeat 10]
Prints one JSON line; the figures are written down in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from mistral_fast.config import DATA_DIR, load_config
    from mistral_fast.dataset import prepare_data
    from mistral_fast.modeling import resolve_model_path
    from mistral_fast.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10, help="copies of the 240 sample conversations")
    args = parser.parse_args()
    datasets.disable_caching()  # TRL's map would otherwise be served from its cache on the second run
    os.environ["MISTRAL_FAST_CACHE"] = tempfile.mkdtemp()  # and ours from its own (a cold build is measured)

    lines = (DATA_DIR / "sample_chat.jsonl").read_text().splitlines() * args.repeat
    tmp = Path(tempfile.mkdtemp())
    (tmp / "chat.jsonl").write_text("\n".join(lines) + "\n")
    tok = load_tokenizer("v3")
    cfg = load_config(None, [f"data.path={tmp / 'chat.jsonl'}", "data.eval_fraction=0", "model.max_seq_length=1024"])

    start = time.perf_counter()
    ours = prepare_data(cfg, tok)
    ours_s = time.perf_counter() - start

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    sft = SFTConfig(
        output_dir=str(tmp / "trl"),
        assistant_only_loss=True,
        max_length=1024,
        report_to="none",
        use_cpu=True,
        dataset_num_proc=None,
    )
    rows = datasets.Dataset.from_list([json.loads(line) for line in lines])
    trainer = SFTTrainer(model=model, args=sft, train_dataset=rows.select(range(8)), processing_class=tok)
    start = time.perf_counter()
    theirs = trainer._prepare_dataset(rows, tok, sft, packing=False, formatting_func=None, dataset_name="bench")
    trl_s = time.perf_counter() - start

    # Same ids and the same trained positions (TRL folds assistant_masks into labels)
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in ours.train}
    same = sum(by_ids.get(tuple(r["input_ids"])) == r["labels"] for r in theirs)
    n = len(lines)
    print(
        json.dumps(
            {
                "examples": n,
                "ours_s": round(ours_s, 2),
                "trl_s": round(trl_s, 2),
                "ours_examples_per_s": round(n / ours_s, 1),
                "trl_examples_per_s": round(n / trl_s, 1),
                "speed_ratio": round(trl_s / ours_s, 2),
                "identical_ids_and_labels": f"{same}/{n}",
            }
        )
    )


if __name__ == "__main__":
    main()
