"""
Demo: greedy generation on a real small target, with and without a PRISM draft.

    python examples/demo.py                      # Qwen2.5-Coder-1.5B-Instruct + its committed PRISM draft
    python examples/demo.py --target smollm2-135m-instruct --draft hub_models/SmolLM2-135M-Instruct-PRISM
    python examples/demo.py --dtype bfloat16     # faster on GPUs and native-bf16 CPUs; can flip near-ties
    python examples/demo.py --no-cpu-speedups    # stock float32 linears for the target and the draft

Prints both outputs, whether they are identical, tokens/s of each and the mean accepted tokens per verification.
In float32 on a CPU both runs use `prism_hf.enable_fast_cpu_linears` on the target (plain `generate` gains as much
as the verification does), and the draft drafts in int8 (`prism_hf.quantize_cpu_linears_int8`): the target
verifies every token, so the output stays plain greedy output.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import prism_hf
from prism_hf.reference_models import load_reference_model

REPO = Path(__file__).resolve().parents[1]
# the target on which the committed draft is fastest against plain `generate` on a CPU: a 1.5B model's decoding is
# memory-bound, so verifying a few drafted tokens costs about one plain step, and the draft layer 3% of it
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = REPO / "hub_models" / "Qwen2.5-Coder-1.5B-Instruct-PRISM"


def timed_generate(target, inputs, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    output = target.generate(**inputs, do_sample=False, **kwargs)
    return output, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="reference model name, dir or Hub id")
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT), help="PRISM draft dir or Hub id")
    parser.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--no-cpu-speedups",
        dest="cpu_speedups",
        action="store_false",
        help="keep stock linears (default in float32 on a CPU: fast linears on the target, an int8 draft)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    dtype = getattr(torch, args.dtype)
    target, tokenizer = load_reference_model(args.target, dtype=dtype)
    draft = prism_hf.PrismDraftModel.from_pretrained(args.draft).to(dtype)
    speedups = "stock linears"
    if args.cpu_speedups and dtype == torch.float32 and target.device.type == "cpu":
        prism_hf.enable_fast_cpu_linears(target)  # plain generate and the verification alike
        prism_hf.quantize_cpu_linears_int8(draft)  # drafting only: the target checks every token
        speedups = "fast linears on the target, int8 draft"
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_length = inputs["input_ids"].shape[1]

    # warm up both paths once so that the timings below measure steady-state decoding
    timed_generate(target, inputs, max_new_tokens=8)
    timed_generate(target, inputs, max_new_tokens=8, assistant_model=draft)

    plain, plain_seconds = timed_generate(target, inputs, max_new_tokens=args.max_new_tokens)
    prism, prism_seconds = timed_generate(target, inputs, max_new_tokens=args.max_new_tokens, assistant_model=draft)
    stats = draft.last_generation_stats
    plain_tokens = plain.shape[1] - prompt_length
    prism_tokens = prism.shape[1] - prompt_length

    print(f"target: {args.target} ({args.dtype}, {speedups})   draft: {args.draft}")
    print(f"prompt: {args.prompt}\n")
    print("--- plain generate ---")
    print(tokenizer.decode(plain[0, prompt_length:], skip_special_tokens=True))
    print("\n--- generate with PRISM draft ---")
    print(tokenizer.decode(prism[0, prompt_length:], skip_special_tokens=True))
    print()
    print(f"identical outputs:       {torch.equal(plain, prism)}")
    print(f"plain:                   {plain_tokens / plain_seconds:6.1f} tokens/s")
    print(
        f"PRISM:                   {prism_tokens / prism_seconds:6.1f} tokens/s "
        f"({plain_seconds / plain_tokens * prism_tokens / prism_seconds:.2f}x)"
    )
    print(
        f"mean accepted tokens:    {stats.mean_accepted_tokens:.2f} per verification "
        f"({stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens accepted)"
    )


if __name__ == "__main__":
    main()
