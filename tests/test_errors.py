"""Every request a PRISM draft cannot serve fails with a clear error instead of a silent wrong answer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gemma3, make_llama, make_qwen2
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import prism_hf


@pytest.fixture(scope="module")
def target():
    return make_llama()


@pytest.fixture(scope="module")
def draft(target):
    return prism_hf.PrismDraftModel.from_target(target)


PROMPT = torch.tensor([[5, 17, 42, 9]])


def test_batch_larger_than_one(target, draft):
    with pytest.raises(ValueError, match="batch size 1 only.*got a batch of 2"):
        target.generate(PROMPT.repeat(2, 1), assistant_model=draft, max_new_tokens=4)


def test_beam_search(target, draft):
    with pytest.raises(ValueError, match="greedy decoding and sampling only.*beam_search"):
        target.generate(PROMPT, assistant_model=draft, num_beams=2, max_new_tokens=4)


def test_num_return_sequences(target, draft):
    with pytest.raises(ValueError, match="num_return_sequences"):
        target.generate(PROMPT, assistant_model=draft, do_sample=True, num_return_sequences=2, max_new_tokens=4)


def test_static_cache(target, draft):
    """transformers >= 5.24 verifies on a static cache when all its layers can be cropped; sliding layers cannot."""
    kwargs = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
    plain = target.generate(PROMPT, **kwargs)
    assert torch.equal(target.generate(PROMPT, assistant_model=draft, cache_implementation="static", **kwargs), plain)
    sliding = make_gemma3()
    with pytest.raises(ValueError, match="requires a cache that can be cropped"):
        sliding.generate(
            PROMPT, assistant_model=prism_hf.PrismDraftModel.from_target(sliding), cache_implementation="static"
        )


def test_prompt_lookup_together_with_draft(target, draft):
    with pytest.raises(ValueError, match="`prompt_lookup_num_tokens` and a PrismDraftModel assistant"):
        target.generate(PROMPT, assistant_model=draft, prompt_lookup_num_tokens=3, max_new_tokens=4)


def test_draft_for_another_architecture(draft):
    other = make_qwen2()
    expected = "does not fit the target.*model_type: draft expects 'llama', target has 'qwen2'"
    with pytest.raises(ValueError, match=expected):
        other.generate(PROMPT, assistant_model=draft, max_new_tokens=4)


def test_draft_for_another_size():
    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    draft = prism_hf.PrismDraftModel.from_target(make_llama())
    expected = r"hidden_size: draft expects 64, target has 96.*vocab_size: draft expects 256"
    with pytest.raises(ValueError, match=expected):
        wider.generate(PROMPT, assistant_model=draft, max_new_tokens=4)
    with pytest.raises(ValueError, match="does not fit the target"):
        draft.bind_target(wider)


def test_unbound_draft_has_clear_error():
    config = prism_hf.PrismConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    draft = prism_hf.PrismDraftModel(config)
    with pytest.raises(RuntimeError, match="not bound to a target"):
        draft.embed(PROMPT)


def test_feature_layer_out_of_range(target):
    with pytest.raises(ValueError, match=r"feature_layers \[7\] are out of range"):
        prism_hf.PrismDraftModel.from_target(target, feature_layers=[7])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_modules": 0}, "`num_modules` must be >= 1"),
        ({"step_module_map": [1, 0], "num_modules": 2}, r"`step_module_map\[0\]` must be 0"),
        ({"step_module_map": [0, 2], "num_modules": 2}, r"names modules \[2\]"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "must be a multiple"),
        ({"num_draft_tokens": 0}, "`num_draft_tokens` must be >= 1"),
        ({"num_draft_tokens_schedule": "fast"}, "`num_draft_tokens_schedule` must be one of"),
        ({"draft_confidence_threshold": 1.5}, "`draft_confidence_threshold` must be a probability between 0 and 1"),
        ({"draft_confidence_threshold": float("nan")}, "`draft_confidence_threshold` must be a probability"),
        (
            {"draft_confidence_rule": "joint"},
            r"`draft_confidence_rule` must be one of \('token', 'path'\), got 'joint'",
        ),
        (
            {"copy_max_ngram": 8, "copy_streak_tokens": 16, "copy_streak_max_tokens": -1},
            r"`copy_streak_max_tokens` must be an integer >= 0 \(0: streaks keep their length\), got -1",
        ),
        (
            {"copy_max_ngram": 8, "copy_streak_max_tokens": 32},
            "`copy_streak_max_tokens` bounds how far copy streaks grow: set `copy_streak_tokens` too",
        ),
        (
            {"copy_max_ngram": 8, "copy_streak_tokens": 16, "copy_streak_max_tokens": 8},
            r"`copy_streak_max_tokens` \(8\) bounds how far copy streaks grow from `copy_streak_tokens` \(16\)",
        ),
    ],
)
def test_invalid_config(fields, message):
    with pytest.raises(ValueError, match=message):
        prism_hf.PrismConfig(**fields)


def test_unknown_schedule(target, draft):
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule='fancy' is not supported"):
        target.generate(PROMPT, assistant_model=draft, num_assistant_tokens_schedule="fancy", max_new_tokens=4)


def test_confidence_threshold_out_of_range(target, draft):
    message = "`assistant_confidence_threshold` must be a probability between 0 and 1, got -0.1"
    with pytest.raises(ValueError, match=message):
        target.generate(PROMPT, assistant_model=draft, assistant_confidence_threshold=-0.1, max_new_tokens=4)


def test_requests_that_would_give_wrong_output(target, draft):
    """Each of these used to run and return other tokens than plain `generate` (or crash unclearly)."""
    prefilled = DynamicCache(config=target.config)
    target(PROMPT[:, :2], past_key_values=prefilled, use_cache=True)
    with pytest.raises(
        ValueError, match="PRISM drafting starts from an empty KV cache; the `cache` passed to `generate`"
    ):
        target.generate(PROMPT, past_key_values=prefilled, assistant_model=draft, max_new_tokens=4)
    with pytest.raises(
        ValueError, match=r"PRISM drafting does not support classifier-free guidance \(guidance_scale=3"
    ):
        target.generate(PROMPT, guidance_scale=3.0, assistant_model=draft, max_new_tokens=4)
    embeddings = target.get_input_embeddings()(PROMPT)
    with pytest.raises(ValueError, match="PRISM drafting needs the prompt's token ids: pass `input_ids`"):
        target.generate(inputs_embeds=embeddings, assistant_model=draft, max_new_tokens=4)
    with pytest.raises(ValueError, match="`use_mtp` and a PrismDraftModel assistant are two different drafting"):
        target.generate(PROMPT, use_mtp=True, assistant_model=draft, max_new_tokens=4)
    with pytest.raises(ValueError, match="PrismDraftModel drafts in the target's own vocabulary"):
        target.generate(
            PROMPT, assistant_model=draft, tokenizer=object(), assistant_tokenizer=object(), max_new_tokens=4
        )


def test_prompt_given_as_ids_and_embeddings(target, draft):
    """PRISM's first round holds no draft, so the target's first pass reads the caller's embeddings."""
    embeddings = target.get_input_embeddings()(PROMPT).detach() * 1.5
    kwargs = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
    plain = target.generate(PROMPT, inputs_embeds=embeddings, **kwargs)
    assert not torch.equal(plain, target.generate(PROMPT, **kwargs))
    assert torch.equal(target.generate(PROMPT, inputs_embeds=embeddings, assistant_model=draft, **kwargs), plain)
