"""A tiny chat model saved like a Hub checkpoint (byte-level tokenizer with a chat template, small random Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOPICS = ["the sky", "rivers", "bread", "chess", "volcanoes", "owls", "trains", "tea", "maps", "bees"]


def save_tiny_chat_target(path: Path, reversed_vocabulary: bool = False) -> Path:
    """
    A tiny random chat Llama with a byte-level tokenizer; `reversed_vocabulary` numbers the bytes the other way, so
    the same text has other token ids (a model of another family).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=reversed_vocabulary)
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    tiny_chat_llama(tokenizer).save_pretrained(path)
    return path


def tiny_chat_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama over `tokenizer`'s vocabulary, with its special tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # peaked next-token distributions, like a real model's
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def write_chat_data(path: Path) -> Path:
    """A JSONL file of short conversations in the `{"messages": [...]}` format `prism-hf train --data` reads."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me one fact about {topic}."},
                {"role": "assistant", "content": f"Here is a fact about {topic}: it is older than you think."},
            ]
        }
        for topic in TOPICS
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
