"""PRISM draft model: per-step parameter sets over the verifier's hidden states (arXiv 2602.01762)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_prism import PrismConfig
from .generation_hooks import install_generation_hooks


class PrismRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class PrismRotaryEmbedding(nn.Module):
    """
    Plain rotary embedding; the draft has its own rope so it does not depend on the verifier's rope variant.
    The frequencies are computed per call (head_dim / 2 numbers) rather than kept in a non-persistent buffer,
    which `from_pretrained`'s meta-device initialisation would leave uninitialised.
    """

    def __init__(self, config: PrismConfig):
        super().__init__()
        self.dim = config.head_dim
        self.rope_theta = config.rope_theta

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=position_ids.device).float() / self.dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class PrismKeyValues:
    """Keys and values of one draft layer call, `[batch, kv_heads, seq, head_dim]` each."""

    keys: torch.Tensor
    values: torch.Tensor


class PrismAttention(nn.Module):
    def __init__(self, config: PrismConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: PrismKeyValues | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, PrismKeyValues]:
        """
        `attention_mask` is a boolean `[query, past + query]` matrix (True = attend), or `None` for "attend to all
        past keys and causally among the new ones".
        """
        batch, seq, _ = hidden_states.shape
        cos, sin = position_embeddings
        query = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        new_key_values = PrismKeyValues(key, value)

        if past_key_values is not None:
            key = torch.cat([past_key_values.keys, key], dim=-2)
            value = torch.cat([past_key_values.values, value], dim=-2)
        if attention_mask is None and seq > 1:
            past = key.shape[-2] - seq
            attention_mask = torch.ones(seq, key.shape[-2], dtype=torch.bool, device=key.device).tril(past)
        # grouped key/value heads go to torch as they are: repeating them per query head would copy the whole cache
        # at every drafting step, and torch's attention gives the same result either way
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, enable_gqa=self.num_key_value_groups > 1
        )
        attn = attn.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(attn), new_key_values


class PrismMLP(nn.Module):
    def __init__(self, config: PrismConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class PrismDecoderLayer(nn.Module):
    """A Llama-style decoder layer without the input norm: its input is already the `fc` projection (as in EAGLE)."""

    def __init__(self, config: PrismConfig):
        super().__init__()
        self.self_attn = PrismAttention(config)
        self.post_attention_layernorm = PrismRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PrismMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: PrismKeyValues | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PrismKeyValues]:
        attn_out, new_key_values = self.self_attn(hidden_states, position_embeddings, past_key_values, attention_mask)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, new_key_values


class CopyIndex:
    """
    The continuation of every n-gram (n = 1..`max_ngram`) at its latest occurrence in a token sequence: what the
    copy head proposes (see `PrismConfig.copy_max_ngram`). `extend` appends accepted tokens; `extend(...,
    speculative=True)` appends drafted ones, whose n-grams live in an overlay that `discard_speculative` drops, so a
    rejected draft costs nothing to forget.
    """

    def __init__(self, max_ngram: int):
        if max_ngram < 1:
            raise ValueError(f"A copy index matches n-grams of at least one token, got max_ngram={max_ngram}.")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._num_accepted = 0
        self._continuations: dict[tuple[int, ...], int] = {}
        self._speculative: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int], speculative: bool = False) -> None:
        if not speculative and len(self.tokens) > self._num_accepted:
            raise RuntimeError("Discard the speculative tokens before extending the accepted ones.")
        table = self._speculative if speculative else self._continuations
        for token in tokens:
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                table[tuple(self.tokens[end - n : end])] = int(token)
            self.tokens.append(int(token))
        if not speculative:
            self._num_accepted = len(self.tokens)

    def discard_speculative(self) -> None:
        del self.tokens[self._num_accepted :]
        self._speculative.clear()

    def lookup(self) -> tuple[int, int]:
        """`(token, n)`: what followed the longest suffix of `n` tokens seen before, or `(-1, 0)` for no match."""
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), 0, -1):
            key = tuple(self.tokens[end - n :])
            token = self._speculative.get(key, self._continuations.get(key))
            if token is not None:
                return token, n
        return -1, 0


def copy_candidates(input_ids: torch.Tensor, max_ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The copy head's proposal for every pair of `input_ids` (`[batch, seq]`), as drafting looks it up: pair `p`
    drafts token `p + 2` after tokens `0..p + 1`. Returns target-vocabulary ids (-1: no match) and match lengths,
    `[batch, seq - 1]` each.
    """
    proposals = torch.full((input_ids.shape[0], input_ids.shape[1] - 1), -1, dtype=torch.long)
    lengths = torch.zeros_like(proposals)
    for row, ids in enumerate(input_ids.tolist()):
        index = CopyIndex(max_ngram)
        index.extend(ids[:1])
        for pair, token in enumerate(ids[1:]):
            index.extend([token])
            proposals[row, pair], lengths[row, pair] = index.lookup()
    return proposals.to(input_ids.device), lengths.to(input_ids.device)


class PrismCopyGate(nn.Module):
    """
    The share `g` of a drafting step's probability that goes to the copy proposal: a logistic function of the match
    length (one-hot, 1..`copy_max_ngram`), the draft's log-probability of the proposed token and of its own best
    token. The step drafts from `(1 - g) * p_draft + g * onehot(proposal)`.
    """

    def __init__(self, config: PrismConfig):
        super().__init__()
        self.max_ngram = config.copy_max_ngram
        self.weight = nn.Parameter(torch.empty(self.max_ngram + 2))
        self.bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A cautious start (`g` = 0.12 everywhere) until the gate is fitted (`prism_hf.training.fit_copy_gate`)."""
        self.weight.zero_()
        self.bias.fill_(-2.0)

    def forward(
        self, lengths: torch.Tensor, proposal_logprob: torch.Tensor, top_logprob: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log g, log(1 - g))` per position; `lengths` >= 1 where there is a proposal."""
        dtype = self.weight.dtype
        length_code = F.one_hot((lengths.clamp(1, self.max_ngram) - 1).long(), self.max_ngram).to(dtype)
        scores = torch.stack([proposal_logprob, top_logprob], dim=-1).to(dtype).clamp(min=-30.0)
        logit = torch.cat([length_code, scores], dim=-1) @ self.weight + self.bias
        return F.logsigmoid(logit), F.logsigmoid(-logit)


@dataclass
class PrismDraftOutput(ModelOutput):
    """
    Output of the unrolled training forward.

    Args:
        step_hidden_states (`tuple[torch.Tensor]`):
            One `[batch, seq - 1, hidden]` tensor per drafting step. Entry `k - 1` at pair position `p` is the
            draft feature of step k for the token at `p + 2`, drafted from the accepted context up to `p - k + 1`.
        step_logits (`tuple[torch.Tensor]`):
            The matching logits over the draft vocabulary.
    """

    step_hidden_states: tuple[torch.Tensor, ...] | None = None
    step_logits: tuple[torch.Tensor, ...] | None = None


class _VerifierHeads:
    """
    The verifier's embedding and LM head, held by reference: never saved with, nor trained in, the draft.

    `head_dtype` is the dtype the LM head takes as input (a quantized head stores integers but computes in the
    target's float dtype). `draft_lm_weight` is the dense slice of the LM head over the reduced draft vocabulary;
    `slice_key` records what it was read from, so that binding the same target again reuses it. `draft_lm_int8` is
    that slice as an int8 dynamically quantized linear, when the draft drafts with one (see
    [`PrismDraftModel.quantize_lm_head_int8`]).
    """

    def __init__(
        self,
        embed_tokens: nn.Module,
        lm_head: nn.Module,
        head_dtype: torch.dtype,
        draft_lm_weight: torch.Tensor | None = None,
        slice_key: tuple | None = None,
        draft_lm_int8: nn.Module | None = None,
    ):
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.head_dtype = head_dtype
        self.draft_lm_weight = draft_lm_weight
        self.slice_key = slice_key
        self.draft_lm_int8 = draft_lm_int8


def _int8_linear(weight: torch.Tensor) -> nn.Module:
    """`weight` as torch's int8 dynamically quantized linear (per-output-channel scales, inputs quantized per call)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    float_linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    float_linear.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that torchao is its successor
        warnings.simplefilter("ignore")
        return DynamicInt8Linear.from_float(float_linear)


def _slice_key(weight: Any, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple:
    """What an LM-head slice was read from: the tensors themselves (kept alive by the key), then plain values."""
    version = weight._version if isinstance(weight, torch.Tensor) else None
    return (weight, ids), (version, ids._version, dtype, device)


def _same_key(cached: tuple | None, key: tuple) -> bool:
    """Same tensor objects, unchanged in place since, and the same cast."""
    if cached is None:
        return False
    return all(a is b for a, b in zip(cached[0], key[0], strict=True)) and cached[1] == key[1]


def _execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's hook device for a dispatched (possibly offloaded) module."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """
    The 2-D floating-point weight of a linear module, on its execution device: bitsandbytes 4/8-bit weights are
    dequantized, disk/CPU-offloaded weights loaded. Raises a `ValueError` for a weight it cannot read.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return _dense_weight_in_place(module)
    hook.pre_forward(module)  # accelerate loads offloaded weights here, as `align_module_device` does
    try:
        return _dense_weight_in_place(module)
    finally:
        hook.post_forward(module, None)


def _dense_weight_in_place(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        weight = dequantize_bnb_weight(weight, getattr(module, "state", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        kind = f"a {weight.dtype} weight" if isinstance(weight, torch.Tensor) else "no weight"
        raise ValueError(
            f"The target's LM head ({type(module).__name__}) has {kind}, which the PRISM draft cannot read as a dense "
            "matrix. Only plain and bitsandbytes 4/8-bit LM heads are supported with a reduced draft vocabulary: "
            "keep the LM head unquantized (e.g. `BitsAndBytesConfig(llm_int8_skip_modules=['lm_head'])`)."
        )
    if weight.device.type == "meta":
        raise ValueError(f"The target's LM head ({type(module).__name__}) has no weights loaded (meta device).")
    return weight.detach()


def _describe_key(entry: Any) -> str:
    """Loading-info entries are names, or `(name, checkpoint shape, model shape)` for mismatched tensors."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, found, expected = entry
        return f"{name} (checkpoint {list(found)}, model {list(expected)})"
    return str(entry)


def _looks_like_corrupt_weights(error: Exception) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker in text for marker in ("safetensor", "deserializ", "header", "incomplete metadata"))


class PrismPreTrainedModel(PreTrainedModel):
    config_class = PrismConfig
    base_model_prefix = "prism"
    _no_split_modules = ["PrismDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, PrismRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PrismCopyGate):
            module.reset_parameters()


class PrismDraftModel(PrismPreTrainedModel):
    """
    PRISM draft: `num_modules` processing modules (`fc[m]` over `[embed(token); feature]`, with
    `config.previous_token_input` `[embed(token); embed(previous token); feature]`, then `layers[m]`), a
    final `norm`, and the verifier's LM head. Drafting step `k` runs module `config.module_for_step(k)`, so a step
    always costs one layer while total capacity grows with the number of modules. With `config.copy_max_ngram`, a
    `copy_gate` mixes each step's distribution with a prompt-lookup proposal ([`CopyIndex`], `mix_copy`).

    Use it as `target.generate(..., assistant_model=draft)`: importing this module routes such calls to
    [`PrismCandidateGenerator`], which binds the draft to the target and checks that they fit.
    """

    def __init__(self, config: PrismConfig):
        super().__init__(config)
        num_features = len(config.feature_layers)
        self.feature_fusion = (
            nn.Linear(num_features * config.hidden_size, config.hidden_size, bias=False) if num_features > 1 else None
        )
        # Fused intermediate states are the verifier's raw residual stream, whose scale grows with depth and which
        # holds massive activations (SmolLM2-135M: a norm of ~25,000 at the first position of layer 15 against ~170
        # elsewhere, and ~45 for the final, normalised state): each gets an RMSNorm (learned scale) before the fusion,
        # as the final state had the verifier's own. A single feature layer goes in as it is.
        self.feature_norms = (
            nn.ModuleDict(
                {
                    str(place): PrismRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
                    for place, layer in enumerate(config.feature_layers)
                    if not config.is_final_feature_layer(layer)
                }
            )
            if num_features > 1
            else None
        )
        fc_inputs = (config.num_token_inputs + 1) * config.hidden_size
        self.fc = nn.ModuleList(
            [nn.Linear(fc_inputs, config.hidden_size, bias=False) for _ in range(config.num_modules)]
        )
        self.layers = nn.ModuleList([PrismDecoderLayer(config) for _ in range(config.num_modules)])
        self.norm = PrismRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.copy_gate = PrismCopyGate(config) if config.copy_max_ngram else None
        self.rotary_emb = PrismRotaryEmbedding(config)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_to_target", torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_to_target = None
        self._verifier: _VerifierHeads | None = None
        self._int8_lm_head = False
        self.post_init()

    # ---------------------------------------------------------------- building and binding

    @classmethod
    def from_target(cls, target: PreTrainedModel, **overrides: Any) -> PrismDraftModel:
        """
        Builds an untrained draft sized for `target` (any HF causal LM): its layer shape copies the target's, and
        the config records the target's identity. Keyword arguments override [`PrismConfig`] fields; `dtype`
        (default: the target's) sets the draft's parameter dtype.
        """
        dtype = overrides.pop("dtype", target.dtype)  # a quantized target's float (compute) dtype
        if not dtype.is_floating_point:
            raise ValueError(f"The PRISM draft must have floating-point parameters, got dtype={dtype}.")
        text = target.config.get_text_config()
        num_heads = text.num_attention_heads
        rope_parameters = getattr(text, "rope_parameters", None) or {}
        fields: dict[str, Any] = {
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // num_heads,
            "rope_theta": rope_parameters.get("rope_theta", getattr(text, "rope_theta", 10000.0)),
            "rms_norm_eps": getattr(text, "rms_norm_eps", 1e-5),
            "max_position_embeddings": getattr(text, "max_position_embeddings", 8192),
            "verifier_name_or_path": target.config.name_or_path or None,
            "verifier_model_type": text.model_type,
            "verifier_hidden_size": text.hidden_size,
            "verifier_vocab_size": text.vocab_size,
            "verifier_num_hidden_layers": text.num_hidden_layers,
        }
        fields.update(overrides)
        lm_head = target.get_output_embeddings()
        device = _execution_device(lm_head if lm_head is not None else target)
        draft = cls(PrismConfig(**fields)).to(dtype=dtype, device=device)
        draft.bind_target(target)
        return draft

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """
        Loads a draft like any `PreTrainedModel`, but refuses a checkpoint with missing, unexpected or mis-shaped
        weights instead of silently initialising them at random (a random draft is correct but useless).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # reported below, with the tensor names, instead of loaded
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as error:
            if not _looks_like_corrupt_weights(error):
                raise
            raise OSError(
                f"The PRISM draft weights at {pretrained_model_name_or_path} are corrupt or truncated ({error}). "
                "Re-download or re-save the checkpoint."
            ) from error
        problems = {
            kind: sorted(_describe_key(k) for k in info.get(kind) or ())
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            details = "; ".join(f"{kind}: {', '.join(keys[:8])}" for kind, keys in problems.items())
            raise ValueError(
                f"The PRISM draft checkpoint at {pretrained_model_name_or_path} does not match its config "
                f"({details}). It may be corrupt or saved by an incompatible version."
            )
        return (model, info) if output_loading_info else model

    def check_target(self, target: PreTrainedModel) -> None:
        """Raises a `ValueError` naming every mismatch between `target` and the verifier this draft was made for."""
        text = target.config.get_text_config()
        expected = {
            "model_type": self.config.verifier_model_type,
            "hidden_size": self.config.verifier_hidden_size,
            "vocab_size": self.config.verifier_vocab_size,
            "num_hidden_layers": self.config.verifier_num_hidden_layers,
        }
        problems = [
            f"{name}: draft expects {value!r}, target has {getattr(text, name, None)!r}"
            for name, value in expected.items()
            if value is not None and getattr(text, name, None) != value
        ]
        if text.hidden_size != self.config.hidden_size:
            problems.append(f"hidden_size: draft layer is {self.config.hidden_size}, target has {text.hidden_size}")
        if problems:
            made_for = self.config.verifier_name_or_path or "another model"
            raise ValueError(
                f"This PRISM draft was made for {made_for} and does not fit the target "
                f"{target.config.name_or_path or type(target).__name__}: " + "; ".join(problems) + "."
            )
        num_states = text.num_hidden_layers + 1
        out_of_range = [i for i in self.config.feature_layers if not -num_states <= i < num_states]
        if out_of_range:
            raise ValueError(f"feature_layers {out_of_range} are out of range for a target with {num_states} states.")

    def bind_target(self, target: PreTrainedModel) -> None:
        """
        Checks `target` and takes its token embedding and LM head (by reference) for drafting. The target may be
        quantized (bitsandbytes 4/8-bit) or dispatched with a `device_map` (layers offloaded to CPU or disk): a
        reduced draft vocabulary reads the LM head once, dequantized, and keeps its slice in the draft's dtype.
        """
        self.check_target(target)
        embed_tokens, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        if embed_tokens is None or lm_head is None:
            raise ValueError(f"{type(target).__name__} has no input embeddings or LM head to share with the draft.")
        weight = getattr(lm_head, "weight", None)
        head_dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else target.dtype
        if self.draft_to_target is None:
            self._verifier = _VerifierHeads(embed_tokens, lm_head, head_dtype)
            return
        key = _slice_key(weight, self.draft_to_target, self.dtype, self.device)
        previous = self._verifier
        if previous is not None and _same_key(previous.slice_key, key):
            draft_lm_weight, draft_lm_int8 = previous.draft_lm_weight, previous.draft_lm_int8
        else:
            dense = _dense_weight(lm_head)
            rows = dense[self.draft_to_target.to(dense.device)]
            draft_lm_weight, draft_lm_int8 = rows.to(device=self.device, dtype=self.dtype), None
        if self._int8_lm_head and draft_lm_int8 is None:
            self._check_int8_lm_head()
            draft_lm_int8 = _int8_linear(draft_lm_weight)
        self._verifier = _VerifierHeads(embed_tokens, lm_head, head_dtype, draft_lm_weight, key, draft_lm_int8)

    def quantize_lm_head_int8(self) -> None:
        """
        Drafts with an int8 copy of the draft-vocabulary slice of the LM head (torch's dynamically quantized linear,
        per-row scales), now and whenever the draft is bound again.

        On a CPU that slice is most of what a draft step reads (32768 x 576 float32 rows for SmolLM2, against one
        small layer), and a one-row float32 product is memory-bound: int8 reads a quarter of the bytes. The target
        still verifies every token, so greedy output stays identical to plain `generate` and sampling stays exact
        (the draft's probabilities come from the same int8 logits that proposed the tokens). For inference on the
        CPU in float32; training keeps the float slice. [`prism_hf.quantize_cpu_linears_int8`] calls this for a
        PRISM draft, and leaves its layers in float32.
        """
        self._check_int8_lm_head()
        self._int8_lm_head = True
        if self._verifier is not None and self._verifier.draft_lm_int8 is None:
            self._verifier.draft_lm_int8 = _int8_linear(self._verifier.draft_lm_weight)

    @property
    def verifier(self) -> _VerifierHeads:
        if self._verifier is None:
            raise RuntimeError(
                "This PRISM draft is not bound to a target: call `draft.bind_target(target)` or pass it to "
                "`target.generate(..., assistant_model=draft)`."
            )
        return self._verifier

    def build_candidate_generator(self, **kwargs: Any):
        """Entry point of the generation hook: `generate(assistant_model=draft)` drafts through this."""
        from .generation_prism import PrismCandidateGenerator

        return PrismCandidateGenerator(draft_model=self, **kwargs)

    def int8_lm_head_refusal(self) -> str | None:
        """Why this draft cannot draft with an int8 LM head (see `quantize_lm_head_int8`), or None when it can."""
        if self.draft_to_target is None:
            return (
                "This draft uses the target's whole LM head (no draft_vocab_size), which belongs to the target: "
                "quantizing it would change the target's output. Only a reduced draft vocabulary drafts in int8."
            )
        if self.dtype != torch.float32 or self.device.type != "cpu":
            return f"An int8 LM head is for float32 drafts on the CPU; this draft is {self.dtype} on {self.device}."
        return None

    def _check_int8_lm_head(self) -> None:
        refusal = self.int8_lm_head_refusal()
        if refusal is not None:
            raise ValueError(refusal)

    # ---------------------------------------------------------------- building blocks shared by training and drafting

    def fuse_features(
        self, hidden_states: tuple[torch.Tensor | None, ...] | list[torch.Tensor], length: int | None = None
    ) -> torch.Tensor:
        """
        Selects the configured verifier states from a full `hidden_states` tuple (optionally only the first `length`
        positions) and fuses them into one feature per position.
        """
        selected = []
        for index in self.config.feature_layers:
            state = hidden_states[index]
            if state is None:
                raise ValueError(f"The verifier did not return hidden state {index} needed by the PRISM draft.")
            if length is not None:
                if state.shape[1] < length:
                    raise RuntimeError(
                        f"The verifier returned hidden states for {state.shape[1]} positions, but {length} positions "
                        "need draft features."
                    )
                state = state[:, :length]
            selected.append(state)
        return self.fuse_selected_features(selected)

    def fuse_selected_features(self, states: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """
        Fuses verifier states already selected by `config.feature_layers`, one per entry and in that order (what
        training stores: [`TargetFeatures.hidden_states`]), into one feature per position.
        """
        if len(states) != len(self.config.feature_layers):
            raise ValueError(
                f"Expected {len(self.config.feature_layers)} verifier states (feature_layers "
                f"{self.config.feature_layers}), got {len(states)}."
            )
        states = [state.to(device=self.device, dtype=self.dtype) for state in states]
        if self.feature_fusion is None:
            return states[0]
        norms = self.feature_norms
        states = [norms[str(i)](state) if str(i) in norms else state for i, state in enumerate(states)]
        return self.feature_fusion(torch.cat(states, dim=-1))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed_tokens = self.verifier.embed_tokens
        input_ids = input_ids.to(_execution_device(embed_tokens))
        return embed_tokens(input_ids).to(device=self.device, dtype=self.dtype)

    def embed_pairs(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """
        The token side of pairs `start, start + 1, ...` of `input_ids` (`[batch, seq - 1 - start, hidden * n]`): pair
        `p`'s token `p + 1`, then with `config.previous_token_input` token `p`.
        """
        embeds = self.embed(input_ids[:, start + 1 :])
        if not self.config.previous_token_input:
            return embeds
        return torch.cat([embeds, self.embed(input_ids[:, start:-1])], dim=-1)

    def run_module(
        self,
        module_index: int,
        token_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: PrismKeyValues | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PrismKeyValues]:
        """
        One drafting step of module `module_index` over pairs `(feature at p, token at p + 1)`; `token_embeds` is
        their token side from `embed_pairs`.
        """
        hidden = self.fc[module_index](torch.cat([token_embeds, features], dim=-1))
        position_embeddings = self.rotary_emb(position_ids, dtype=hidden.dtype)
        return self.layers[module_index](hidden, position_embeddings, past_key_values, attention_mask)

    def compute_logits(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the full target vocabulary unless `draft_vocab_size` is set)."""
        normed = self.norm(draft_hidden)
        if self.verifier.draft_lm_int8 is not None:
            return self.verifier.draft_lm_int8(normed)
        if self.verifier.draft_lm_weight is not None:
            return F.linear(normed, self.verifier.draft_lm_weight)
        verifier = self.verifier
        normed = normed.to(device=_execution_device(verifier.lm_head), dtype=verifier.head_dtype)
        return verifier.lm_head(normed).to(self.device)

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids of target token ids (-1 stays -1, and so does a token outside the draft vocabulary)."""
        if self.draft_to_target is None:
            return target_ids
        key = (self.draft_to_target.data_ptr(), self.draft_to_target._version)
        if getattr(self, "_target_to_draft_key", None) != key:
            inverse = torch.full((self.config.verifier_vocab_size + 1,), -1, dtype=torch.long, device=self.device)
            inverse[self.draft_to_target] = torch.arange(self.draft_to_target.shape[0], device=self.device)
            self._target_to_draft, self._target_to_draft_key = inverse, key
        # -1 reads the extra last entry, which is -1
        return self._target_to_draft[target_ids.to(self.device)]

    def mix_copy(self, draft_logits: torch.Tensor, proposals: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """
        What a drafting step draws from: with a copy head, the log-probabilities of
        `(1 - g) * p + g * onehot(proposal)` over the draft vocabulary (`p` the softmax of `draft_logits`, `g` from
        `copy_gate`) where a proposal (draft-vocabulary ids from `to_draft_ids`, -1 for none) exists, `log p`
        elsewhere; without a copy head, `draft_logits` unchanged. Training, evaluation and drafting all pick tokens
        from this.
        """
        if self.copy_gate is None:
            return draft_logits
        logp = draft_logits.float().log_softmax(dim=-1)
        has_proposal = proposals >= 0
        index = proposals.clamp(min=0).unsqueeze(-1)
        proposal_logprob = logp.gather(-1, index).squeeze(-1)
        log_gate, log_keep = self.copy_gate(lengths, proposal_logprob, logp.amax(dim=-1))
        log_keep = torch.where(has_proposal, log_keep.float(), 0.0)
        at_proposal = torch.where(
            has_proposal, torch.logaddexp(proposal_logprob + log_keep, log_gate.float()), proposal_logprob
        )
        return (logp + log_keep.unsqueeze(-1)).scatter(-1, index, at_proposal.unsqueeze(-1))

    def drafting_logits(
        self, draft_hidden: torch.Tensor, copy_proposals: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """
        What a drafting step draws from, over the draft vocabulary: the logits of `draft_hidden` (`compute_logits`),
        with a copy head's `(proposals, lengths)` of the same rows mixed in (`mix_copy`) when given. Training's loss,
        held-out evaluation and drafting all score this, so a draft is trained on what it drafts from.
        """
        logits = self.compute_logits(draft_hidden)
        if copy_proposals is None:
            return logits
        return self.mix_copy(logits, *copy_proposals)

    def to_target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Scatters draft-vocabulary logits into the target vocabulary (tokens outside it get `-inf`)."""
        if self.draft_to_target is None:
            return draft_logits
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.config.verifier_vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target, draft_logits)

    # ---------------------------------------------------------------- unrolled training forward

    def forward(
        self,
        input_ids: torch.LongTensor,
        features: torch.Tensor,
        num_steps: int = 3,
        detach_step_inputs: bool = False,
        output_logits: bool = True,
    ) -> PrismDraftOutput:
        """
        Unrolled multi-step forward used in training, computing exactly what drafting computes.

        `input_ids` `[batch, seq]` and the fused verifier `features` `[batch, seq, hidden]` are aligned (feature
        `p` is the verifier state after token `p`). Step 1 runs module 0 over every pair `(feature p, token p+1)`;
        step `k` feeds back step `k - 1`'s draft features, attends to module-0 keys of the context up to
        `p - k + 1` and to its own earlier steps' keys on the diagonal, just as the shared draft KV cache does at
        inference. Tokens stay the true ones (teacher forcing). With `output_logits=False` only the draft features are
        returned (evaluation computes logits chunk by chunk instead of holding every step's at once).
        """
        if input_ids.shape[1] < 2:
            raise ValueError("The training forward needs sequences of at least 2 tokens.")
        token_embeds = self.embed_pairs(input_ids)
        step_features = features[:, :-1].to(self.dtype)
        seq = token_embeds.shape[1]
        position_ids = torch.arange(seq, device=self.device)[None].expand(input_ids.shape[0], -1)
        positions = torch.arange(seq, device=self.device)

        step_hidden: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for step in range(1, num_steps + 1):
            if step > 1:
                previous = step_hidden[-1].detach() if detach_step_inputs else step_hidden[-1]
                step_features = torch.cat([torch.zeros_like(previous[:, :1]), previous[:, :-1]], dim=1)
            past = PrismKeyValues(torch.cat(keys, dim=-2), torch.cat(values, dim=-2)) if keys else None
            mask = self._unrolled_mask(step, positions)
            hidden, new_kv = self.run_module(
                self.config.module_for_step(step), token_embeds, step_features, position_ids, past, mask
            )
            keys.append(new_kv.keys)
            values.append(new_kv.values)
            step_hidden.append(hidden)
            if output_logits:
                step_logits.append(self.compute_logits(hidden))
        return PrismDraftOutput(
            step_hidden_states=tuple(step_hidden), step_logits=tuple(step_logits) if output_logits else None
        )

    @staticmethod
    def _unrolled_mask(step: int, positions: torch.Tensor) -> torch.Tensor:
        """`[seq, step * seq]` mask: step-1 keys up to `p - step + 1`, then step-j keys only at `p - step + j`."""
        query = positions[:, None]
        blocks = [positions[None, :] <= query - (step - 1)]
        blocks += [positions[None, :] == query - (step - j) for j in range(2, step + 1)]
        return torch.cat(blocks, dim=1)


install_generation_hooks()

__all__ = ["CopyIndex", "PrismDraftModel", "PrismPreTrainedModel", "PrismDraftOutput", "copy_candidates"]
