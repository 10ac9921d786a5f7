"""Shared fixtures: tiny random targets built in code, and a PRISM draft trained on one of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_chat import save_tiny_chat_target, write_chat_data  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import prism_hf  # noqa: E402
from prism_hf.training import PhaseConfig, compute_target_features, expand_modules, train_phase  # noqa: E402

VOCAB = 256
# A larger init range than usual makes the random targets' next-token distributions peaked, like real models,
# so that greedy continuations are not decided by near-ties and a draft can learn them.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_peaked_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over a handful of tokens, with peaked but not one-hot distributions (for sampling tests)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **COMMON
        | dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.3)
        | dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=2048)
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a busy machine thread hand-offs make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_llama(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **COMMON)).eval()


def make_qwen2(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, **COMMON)).eval()


def make_gemma3(seed: int = 0) -> PreTrainedModel:
    """Gemma 3 with sliding-window layers whose window (6) is far shorter than the generated sequences."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        num_hidden_layers=3,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        **COMMON,
    )
    return Gemma3ForCausalLM(config).eval()


TARGET_FACTORIES = {"llama": make_llama, "qwen2": make_qwen2, "gemma3": make_gemma3}


@pytest.fixture(scope="session", params=sorted(TARGET_FACTORIES))
def tiny_target(request) -> PreTrainedModel:
    return TARGET_FACTORIES[request.param]()


@pytest.fixture(scope="session")
def llama_target() -> PreTrainedModel:
    return make_llama()


@contextmanager
def draft_config_set(draft: prism_hf.PrismDraftModel, **fields: Any) -> Iterator[None]:
    """Sets fields of a (session-scoped) draft's config for one block and restores them afterwards."""
    saved = {name: getattr(draft.config, name) for name in fields}
    for name, value in fields.items():
        setattr(draft.config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(draft.config, name, value)


def training_prompts(num: int = 8, length: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (num, length), generator=generator)


def train_tiny_draft(target: PreTrainedModel, prompts: torch.Tensor, num_modules: int = 2) -> prism_hf.PrismDraftModel:
    """
    Trains a draft with the PRISM recipe on the target's own greedy continuations of `prompts` (a few hundred
    updates), so that generating from those prompts really accepts drafted tokens.
    """
    torch.manual_seed(0)
    sequences = target.generate(prompts, do_sample=False, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    batches = [compute_target_features(target, sequences[i : i + 4], [-1]) for i in range(0, len(sequences), 4)]
    draft = prism_hf.PrismDraftModel.from_target(target, num_modules=1, step_module_map=[0])
    train_phase(draft, batches, PhaseConfig(learning_rate=3e-3), num_updates=200, progress=False)
    if num_modules > 1:
        draft = expand_modules(draft, num_modules)
        phase2 = PhaseConfig(learning_rate=1e-3, regression_weight=0.0, detach_step_inputs=False)
        train_phase(draft, batches, phase2, num_updates=100, progress=False)
    return draft


@pytest.fixture(scope="session")
def trained_llama_draft(llama_target) -> prism_hf.PrismDraftModel:
    return train_tiny_draft(llama_target, training_prompts())


# ---- a tiny chat model saved like a Hub checkpoint, for the examples and notebooks


@pytest.fixture(scope="session")
def tiny_chat_target(tmp_path_factory) -> Path:
    return save_tiny_chat_target(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_draft(tiny_chat_target, tmp_path_factory) -> Path:
    """An untrained draft for the tiny chat model: it drafts badly, but generation with it stays exact."""
    path = tmp_path_factory.mktemp("tiny-draft")
    target = LlamaForCausalLM.from_pretrained(tiny_chat_target)
    torch.manual_seed(0)
    prism_hf.PrismDraftModel.from_target(target).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chats.jsonl")
