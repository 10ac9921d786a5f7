"""Training and drafting compute the same thing: the unrolled training forward reproduces generate()'s drafts."""

from __future__ import annotations

import torch
from conftest import train_tiny_draft, training_prompts
from transformers import GenerationConfig

import prism_hf
from prism_hf.generation_prism import PrismCandidateGenerator
from prism_hf.modeling_prism import copy_candidates
from prism_hf.training import FINETUNE_PHASE, WARMUP_PHASE, compute_target_features, prism_loss


def draft_from_generator(target, draft, prefix: torch.Tensor, num_tokens: int):
    """Candidates the generator proposes after a verification pass over `prefix` (as in `generate`)."""
    generator = PrismCandidateGenerator(
        draft,
        target,
        prefix,
        # no confidence stop: every step's candidate is compared with training's
        GenerationConfig(
            num_assistant_tokens=num_tokens, assistant_confidence_threshold=0.0, do_sample=False, max_length=999
        ),
        None,
        {},
    )
    outputs = target(prefix, output_hidden_states=True)
    candidates, logits = generator.get_candidates(prefix, model_outputs=outputs, is_first_iteration=False)
    return candidates[0, prefix.shape[1] :], logits[0]


def test_step_k_prediction_in_training_equals_step_k_candidate(llama_target, trained_llama_draft):
    assert_training_forward_drafts_like_generate(llama_target, trained_llama_draft)


def test_fused_feature_layers_train_and_draft_alike(llama_target):
    """Low/mid/high states (EAGLE-3 style): training's stored states fuse as drafting's full tuple does."""
    layers = llama_target.config.num_hidden_layers
    torch.manual_seed(0)
    draft = prism_hf.PrismDraftModel.from_target(llama_target, feature_layers=[1, layers - 1, layers])
    sequences = llama_target.generate(
        training_prompts(), do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None
    )
    batch = compute_target_features(llama_target, sequences, draft.config.feature_layers)
    assert len(batch.hidden_states) == 3
    loss, metrics = prism_loss(draft, batch, WARMUP_PHASE)
    assert torch.isfinite(loss) and 0 <= metrics["acc_step1"] <= 1
    assert_training_forward_drafts_like_generate(llama_target, draft)


def test_previous_token_input_trains_and_drafts_alike(llama_target):
    """With the token before each pair's token in its input, training's unrolled steps still draft as generate()."""
    torch.manual_seed(0)
    draft = prism_hf.PrismDraftModel.from_target(llama_target, previous_token_input=True)
    hidden = llama_target.config.hidden_size
    assert [fc.weight.shape[1] for fc in draft.fc] == [3 * hidden] * draft.config.num_modules
    assert_training_forward_drafts_like_generate(llama_target, draft)


def test_copy_head_trains_and_drafts_alike(llama_target):
    """
    With a copy head, training's mixture (proposals looked up over the whole sequence at once) is the distribution
    generate() drafts from (an index grown token by token, drafted tokens in its overlay). The gate trusts the copy
    (g = 0.95) and the context repeats itself, so copies are drafted, also over drafted tokens.
    """
    torch.manual_seed(0)
    draft = prism_hf.PrismDraftModel.from_target(llama_target, copy_max_ngram=3)
    with torch.no_grad():
        draft.copy_gate.bias.fill_(3.0)
    copied = assert_training_forward_drafts_like_generate(llama_target, draft, repeat_prompt=True)
    assert copied >= 4


def assert_training_forward_drafts_like_generate(target, draft, repeat_prompt: bool = False) -> int:
    """Returns how many drafted tokens were the copy head's proposals."""
    prompt = training_prompts()[0][None]
    if repeat_prompt:
        prompt = torch.cat([prompt, prompt], dim=1)
    sequence = target.generate(prompt, do_sample=False, max_new_tokens=30)
    steps = 4  # more steps than modules: steps past the map reuse its last module
    copied = 0
    for anchor in (3, 11, 20) if not repeat_prompt else (3, 11, 20, prompt.shape[1] // 2 + 2):
        prefix = sequence[:, : anchor + 2]  # context up to pair `anchor`, i.e. tokens 0..anchor+1
        candidates, candidate_logits = draft_from_generator(target, draft, prefix, steps)
        # teacher forcing with the draft's own tokens reproduces the drafting trajectory exactly
        drafted_sequence = torch.cat([prefix, candidates[None]], dim=1)
        features = compute_target_features(target, drafted_sequence, draft.config.feature_layers)
        with torch.no_grad():
            output = draft(drafted_sequence, draft.fuse_selected_features(features.hidden_states), num_steps=steps)
        proposals, lengths = copy_candidates(drafted_sequence, max(1, draft.config.copy_max_ngram))
        for k in range(1, steps + 1):
            pair = anchor + k - 1
            training_logits = output.step_logits[k - 1][0, pair]
            with torch.no_grad():
                proposal = draft.to_draft_ids(proposals[0, pair : pair + 1])
                training_logits = draft.mix_copy(training_logits[None], proposal, lengths[0, pair : pair + 1])[0]
            assert training_logits.argmax().item() == candidates[k - 1].item()
            torch.testing.assert_close(
                training_logits.log_softmax(-1), candidate_logits[k - 1].log_softmax(-1), atol=1e-4, rtol=1e-4
            )
            copied += int(draft.copy_gate is not None and proposals[0, pair].item() == candidates[k - 1].item())
    return copied


def test_losses_decrease_and_phases_differ(llama_target):
    sequences = llama_target.generate(
        training_prompts(), do_sample=False, max_new_tokens=40, pad_token_id=0, eos_token_id=None
    )
    batch = compute_target_features(llama_target, sequences, [-1])
    untrained = prism_hf.PrismDraftModel.from_target(llama_target)
    trained = train_tiny_draft(llama_target, training_prompts())
    with torch.no_grad():
        before, metrics_before = prism_loss(untrained, batch, WARMUP_PHASE)
        after, metrics_after = prism_loss(trained, batch, WARMUP_PHASE)
        finetune_loss, _ = prism_loss(trained, batch, FINETUNE_PHASE)
    assert after < before
    assert metrics_after["acc_step1"] > metrics_before["acc_step1"] + 0.3
    assert finetune_loss < after  # no regression term in phase 2
