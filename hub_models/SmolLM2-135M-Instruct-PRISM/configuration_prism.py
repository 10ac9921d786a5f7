"""PRISM draft model configuration."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

DRAFT_LENGTH_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
DRAFT_CONFIDENCE_RULES = ("token", "path")


def check_confidence_threshold(name: str, value: Any) -> None:
    """A draft-confidence threshold is a probability: a number in [0, 1] (NaN and booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a probability between 0 and 1, got {value!r}.")


class PrismConfig(PretrainedConfig):
    r"""
    Configuration of a [`PrismDraftModel`]: an EAGLE-style draft that reads the verifier's hidden states and gives
    each drafting step its own parameter set ("module"), so capacity grows with the number of modules while a draft
    step still costs one small decoder layer (PRISM, arXiv 2602.01762).

    The draft shares the verifier's token embedding and LM head (never stored in the draft checkpoint), so the
    config also records which verifier it was made for; binding the draft to another model fails loudly.

    Args:
        hidden_size (`int`, *optional*, defaults to 576):
            Width of the draft layer. Must equal the verifier's hidden size (the draft consumes its features and
            feeds its LM head).
        intermediate_size (`int`, *optional*, defaults to 1536):
            Width of the SwiGLU MLP of each draft layer.
        num_attention_heads (`int`, *optional*, defaults to 9):
            Attention heads of each draft layer.
        num_key_value_heads (`int`, *optional*):
            Key/value heads (grouped-query attention). Defaults to `num_attention_heads`.
        head_dim (`int`, *optional*):
            Dimension of one head. Defaults to `hidden_size // num_attention_heads`.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary position embedding of the draft layer.
        max_position_embeddings (`int`, *optional*, defaults to 8192):
            Longest sequence the draft is meant for (documentation only: rotary embeddings extrapolate).
        rms_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the RMS norms.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether the q/k/v/o projections have a bias.
        num_modules (`int`, *optional*, defaults to 2):
            Number of processing modules M (each is `fc` + one decoder layer).
        step_module_map (`list[int]`, *optional*, defaults to `[0, 1]`):
            Module used by each drafting step: entry `i` serves step `i + 1`; steps past the end of the list use the
            last entry. Step 1 is the "extend" pass over newly accepted tokens and must use module 0, whose keys and
            values are the ones every later step attends to.
        feature_layers (`list[int]`, *optional*, defaults to `[-1]`):
            Indices into the verifier's `hidden_states` tuple (0 = embeddings, -1 = last, post-norm) whose states
            feed the draft. One index: used as is. Several (e.g. early/middle/late, "PRISM*"): each intermediate
            state RMS-normalised (the last one is already), concatenated and projected back to `hidden_size` by one
            shared `feature_fusion` layer.
        previous_token_input (`bool`, *optional*, defaults to `False`):
            Whether each pair's input also holds the embedding of the token before its token: pair `p` reads
            `[embed(token p + 1); embed(token p); feature p]` instead of `[embed(token p + 1); feature p]`. A key then
            names the token its pair follows, so that one attention hop can find where the current token occurred
            before and read the token that came after it there: the induction (copy) lookup a single layer cannot
            make from the verifier's last state, which holds the next token more than the current one.
        copy_max_ngram (`int`, *optional*, defaults to 0):
            Longest n-gram the copy head matches; 0 drafts without it. With it, each drafting step also looks up the
            longest suffix (up to `copy_max_ngram` tokens) of the text so far that occurred before and proposes the
            token that followed its latest occurrence, as prompt lookup does; a small learned gate (`copy_gate`) puts
            part of the step's probability on that token, from the match length and the draft's own log-probabilities
            of the proposed and of its best token. A draft layer has to learn copying from data, and barely does
            (docs/training.md); the lookup copies by construction and the gate learns when to trust it.
        copy_streak_tokens (`int`, *optional*, defaults to 0):
            With a copy head, what a round does once the lookup matches a full `copy_max_ngram` tokens: 0 goes on
            drafting as usual; N > 0 stops calling the draft and drafts the copied continuation itself, each token
            with probability 1 (no draft step, no confidence stop), until the round holds N tokens (or
            `num_draft_tokens`, if larger). A full match is rarely wrong (0.92 of step-1 proposals at 8 tokens
            matched SmolLM2-135M's next token on held-out replies), so such tokens cost only their verification.
        copy_streak_max_tokens (`int`, *optional*, defaults to 0):
            With copy streaks, how long a streak may grow within one `generate()` call: 0 keeps every streak at
            `copy_streak_tokens`; N > `copy_streak_tokens` doubles the streak length (up to N) after a round whose
            streak was accepted whole and halves it (not below `copy_streak_tokens`) after one cut short. A streak
            that holds usually goes on (a passage or code being repeated: in SmolLM2-135M's greedy replies of up to
            512 tokens to 14 benchmark prompts, 0.69 of the streaks of 16 after a whole one were whole again, 0.24
            after a cut one), so the streak grows where copying runs long and stays short where it breaks, whose
            rejected tokens cost verification.
        draft_vocab_size (`int`, *optional*):
            Size of a reduced draft vocabulary (the most frequent verifier tokens). `None` drafts over the full
            verifier vocabulary. The chosen ids are stored in the checkpoint as the `draft_to_target` buffer.
        num_draft_tokens (`int`, *optional*, defaults to 6):
            Most tokens drafted per verification when `generate()` does not set `num_assistant_tokens`.
        num_draft_tokens_schedule (`str`, *optional*, defaults to `"constant"`):
            How the draft length adapts when `generate()` leaves `num_assistant_tokens_schedule` at its default:
            `"constant"`, `"heuristic"` (+2 after a fully accepted round, -1 otherwise, carried over to the next
            call) or `"heuristic_transient"` (the same, restarting from `num_draft_tokens` at every call).
        draft_confidence_threshold (`float`, *optional*, defaults to 0.5):
            A round stops drafting after a token the draft gave less than this probability (after the same logits
            processors as the target), even before `num_draft_tokens`: a token the draft doubts is often rejected,
            and every token after it is then wasted draft and verification work. `generate(...,
            assistant_confidence_threshold=...)` replaces it for one call (except transformers' default 0.4, which
            `generate()` fills in when the call leaves it unset). 0 drafts every round to its full length. Up to 6
            tokens stopped at 0.5 was the fastest setting measured on a CPU (docs/prism-in-generate.md#draft-length).
        draft_confidence_rule (`str`, *optional*, defaults to `"token"`):
            Which probability `draft_confidence_threshold` is compared with. `"token"` (transformers' rule for its
            assistant models): that of the token just drafted. `"path"`: the product of the probabilities of all the
            round's tokens so far, the draft's estimate that the whole round is accepted (EAGLE-2's path score), so
            a run of tokens that are each only fairly likely ends the round too, while a sure run goes on to
            `num_draft_tokens`.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the SwiGLU MLP.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer.
        verifier_name_or_path (`str`, *optional*):
            Hub id or path of the verifier the draft was made for (informational; not enforced).
        verifier_model_type (`str`, *optional*):
            `model_type` of the verifier's text config (enforced when set).
        verifier_hidden_size (`int`, *optional*):
            Hidden size of the verifier (enforced when set).
        verifier_vocab_size (`int`, *optional*):
            Vocabulary size of the verifier (enforced when set).
        verifier_num_hidden_layers (`int`, *optional*):
            Number of decoder layers of the verifier (enforced when set: feature layers are indexed by it).
    """

    model_type = "prism_draft"

    def __init__(
        self,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = False,
        num_modules: int = 2,
        step_module_map: list[int] | None = None,
        feature_layers: list[int] | None = None,
        previous_token_input: bool = False,
        copy_max_ngram: int = 0,
        copy_streak_tokens: int = 0,
        copy_streak_max_tokens: int = 0,
        draft_vocab_size: int | None = None,
        num_draft_tokens: int = 6,
        num_draft_tokens_schedule: str = "constant",
        draft_confidence_threshold: float = 0.5,
        draft_confidence_rule: str = "token",
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        verifier_name_or_path: str | None = None,
        verifier_model_type: str | None = None,
        verifier_hidden_size: int | None = None,
        verifier_vocab_size: int | None = None,
        verifier_num_hidden_layers: int | None = None,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.num_modules = num_modules
        self.step_module_map = list(step_module_map) if step_module_map is not None else [0, min(1, num_modules - 1)]
        self.feature_layers = list(feature_layers) if feature_layers is not None else [-1]
        self.previous_token_input = previous_token_input
        self.copy_max_ngram = copy_max_ngram
        self.copy_streak_tokens = copy_streak_tokens
        self.copy_streak_max_tokens = copy_streak_max_tokens
        self.draft_vocab_size = draft_vocab_size
        self.num_draft_tokens = num_draft_tokens
        self.num_draft_tokens_schedule = num_draft_tokens_schedule
        self.draft_confidence_threshold = draft_confidence_threshold
        self.draft_confidence_rule = draft_confidence_rule
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.verifier_name_or_path = verifier_name_or_path
        self.verifier_model_type = verifier_model_type
        self.verifier_hidden_size = verifier_hidden_size
        self.verifier_vocab_size = verifier_vocab_size
        self.verifier_num_hidden_layers = verifier_num_hidden_layers
        super().__init__(**kwargs)
        self._validate_prism_fields()

    def _validate_prism_fields(self) -> None:
        if self.num_modules < 1:
            raise ValueError(f"`num_modules` must be >= 1, got {self.num_modules}.")
        if not self.step_module_map:
            raise ValueError("`step_module_map` must name the module of at least the first drafting step.")
        if self.step_module_map[0] != 0:
            raise ValueError(
                f"`step_module_map[0]` must be 0 (the extend pass writes the keys/values every later step reads), "
                f"got {self.step_module_map[0]}."
            )
        bad = [m for m in self.step_module_map if not 0 <= m < self.num_modules]
        if bad:
            raise ValueError(f"`step_module_map` names modules {bad}, but `num_modules` is {self.num_modules}.")
        if not self.feature_layers:
            raise ValueError("`feature_layers` must name at least one verifier layer.")
        ngram = self.copy_max_ngram
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
            raise ValueError(f"`copy_max_ngram` must be an integer >= 0 (0: no copy head), got {ngram!r}.")
        streak = self.copy_streak_tokens
        if isinstance(streak, bool) or not isinstance(streak, int) or streak < 0:
            raise ValueError(f"`copy_streak_tokens` must be an integer >= 0 (0: no copy streaks), got {streak!r}.")
        if streak and not ngram:
            raise ValueError("`copy_streak_tokens` drafts what the copy head matches: set `copy_max_ngram` too.")
        longest = self.copy_streak_max_tokens
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < 0:
            raise ValueError(
                f"`copy_streak_max_tokens` must be an integer >= 0 (0: streaks keep their length), got {longest!r}."
            )
        if longest and not streak:
            raise ValueError(
                "`copy_streak_max_tokens` bounds how far copy streaks grow: set `copy_streak_tokens` too."
            )
        if longest and longest < streak:
            raise ValueError(
                f"`copy_streak_max_tokens` ({longest}) bounds how far copy streaks grow from `copy_streak_tokens` "
                f"({streak}): set it to at least that, or to 0."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.num_draft_tokens_schedule not in DRAFT_LENGTH_SCHEDULES:
            raise ValueError(
                f"`num_draft_tokens_schedule` must be one of {DRAFT_LENGTH_SCHEDULES}, got "
                f"{self.num_draft_tokens_schedule!r}."
            )
        if self.num_draft_tokens < 1:
            raise ValueError(f"`num_draft_tokens` must be >= 1, got {self.num_draft_tokens}.")
        check_confidence_threshold("draft_confidence_threshold", self.draft_confidence_threshold)
        if self.draft_confidence_rule not in DRAFT_CONFIDENCE_RULES:
            raise ValueError(
                f"`draft_confidence_rule` must be one of {DRAFT_CONFIDENCE_RULES}, got {self.draft_confidence_rule!r}."
            )

    def is_final_feature_layer(self, layer: int) -> bool:
        """Whether `hidden_states[layer]` is the verifier's last, normalised state (`-1`, or its layer count)."""
        return layer in (-1, self.verifier_num_hidden_layers)

    @property
    def num_token_inputs(self) -> int:
        """Token embeddings in each pair's input: the pair's token, and with `previous_token_input` the one before."""
        return 2 if self.previous_token_input else 1

    def module_for_step(self, step: int) -> int:
        """Index of the module that runs drafting step `step` (1-based)."""
        if step < 1:
            raise ValueError(f"Drafting steps are 1-based, got {step}.")
        return self.step_module_map[min(step, len(self.step_module_map)) - 1]


__all__ = ["PrismConfig"]
