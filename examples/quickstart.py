"""
Quickstart: generate with and without a PRISM draft and compare text and speed.

    python examples/quickstart.py                                   # SmolLM2-135M-Instruct + its draft, from the Hub
    python examples/quickstart.py --target smollm2-135m-instruct \\
        --draft hub_models/SmolLM2-135M-Instruct-PRISM               # offline: reference model + committed draft

`--target` takes a Hub id, a local folder or a reference-model name (built from PyPI, see prism_hf.reference_models);
`--draft` a Hub id or a local folder. `--custom-generate` runs the same draft through the `custom_generate` repository,
the way a user with only transformers installed would.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

import prism_hf


def timed_generate(target, inputs, **kwargs) -> tuple[torch.Tensor, float]:
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = target.generate(**inputs, do_sample=False, **kwargs)
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    return output, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, float | bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--draft", default="prism-hf/SmolLM2-135M-Instruct-PRISM")
    parser.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--custom-generate", metavar="REPO_OR_DIR", help="e.g. prism-hf/prism-generate")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    target, tokenizer = prism_hf.load_reference_model(args.target, dtype=dtype, device=device)
    draft = prism_hf.PrismDraftModel.from_pretrained(args.draft).to(device=device, dtype=dtype)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = inputs.to(device)
    prompt_length = inputs["input_ids"].shape[1]
    drafting = (
        {"custom_generate": args.custom_generate, "trust_remote_code": True, "prism_draft": draft}
        if args.custom_generate
        else {"assistant_model": draft}
    )

    timed_generate(target, inputs, max_new_tokens=8)  # warm-up: the timings below measure steady decoding
    timed_generate(target, inputs, max_new_tokens=8, **drafting)
    plain, plain_seconds = timed_generate(target, inputs, max_new_tokens=args.max_new_tokens)
    drafted, drafted_seconds = timed_generate(target, inputs, max_new_tokens=args.max_new_tokens, **drafting)
    stats = draft.last_generation_stats
    plain_speed = (plain.shape[1] - prompt_length) / plain_seconds
    drafted_speed = (drafted.shape[1] - prompt_length) / drafted_seconds

    print(f"target: {args.target} ({args.dtype}, {device})   draft: {args.draft}\n")
    print("--- plain generate ---")
    print(tokenizer.decode(plain[0, prompt_length:], skip_special_tokens=True))
    print("\n--- generate with the PRISM draft ---")
    print(tokenizer.decode(drafted[0, prompt_length:], skip_special_tokens=True))
    print()
    identical = torch.equal(plain, drafted)
    print(f"identical outputs:    {identical}")
    print(f"plain:                {plain_speed:6.1f} tokens/s")
    print(f"PRISM:                {drafted_speed:6.1f} tokens/s ({drafted_speed / plain_speed:.2f}x)")
    print(f"mean accepted tokens: {stats.mean_accepted_tokens:.2f} per target pass")
    return {"identical": identical, "speedup": drafted_speed / plain_speed, "tau": stats.mean_accepted_tokens}


if __name__ == "__main__":
    main()
