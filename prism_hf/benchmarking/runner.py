"""
Runs every strategy on one target, prompt by prompt and strategy by strategy (interleaved), measuring each call.

Interleaving (for each prompt, each strategy in turn) rather than one strategy after another makes slow drifts in
machine load (thermal throttling, a neighbour's job) hit all strategies alike, so their ratios stay fair.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..generation_hooks import grouped_query_attention_on_cpu
from ..prompt_data import Prompt
from .prompts import BenchPrompt, encode_prompts
from .strategies import PLAIN, Strategy, plain_strategy

logger = logging.get_logger(__name__)

WARMUP_TOKENS = 8


@dataclass
class RunRecord:
    """
    One (strategy, prompt) measurement.

    Under sampling (`sampled`) outputs are not compared with plain `generate`'s (`identical` is False): the draws
    differ, only their distribution is the same, which the test suite checks statistically.
    `target_forwards` and `target_seconds` come from hooks on the target alone, so drafting (an assistant model, a
    PRISM draft, n-gram lookup) and `generate`'s own bookkeeping are what is left of `seconds`. `error` is set, and
    the timings are zero, when the call raised.
    """

    strategy: str
    prompt_id: str
    category: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    target_forwards: int
    target_seconds: float
    peak_memory_mb: float
    identical: bool
    first_difference: int | None = None
    error: str | None = None
    sampled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        """Tokens per verification forward after the prefill (which yields one token): plain generate gives 1."""
        if self.target_forwards <= 1:
            return float(self.new_tokens)
        return (self.new_tokens - 1) / (self.target_forwards - 1)

    @property
    def draft_share(self) -> float:
        """Share of wall time spent outside target forwards: drafting plus `generate`'s own overhead."""
        return max(0.0, 1.0 - self.target_seconds / self.seconds) if self.seconds > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Reads a record back from `results.json` (derived values are recomputed)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "tau": self.tau,
            "tokens_per_second": self.tokens_per_second,
            "draft_share": self.draft_share,
        }


class TargetMeter:
    """Counts and times the target's forward calls with module hooks (an assistant's own forwards are not counted)."""

    def __init__(self, target: PreTrainedModel):
        self.target = target
        self.forwards = 0
        self.seconds = 0.0
        self._started: float | None = None

    def _pre(self, module, args, kwargs) -> None:
        self._started = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        if self._started is not None:
            self.forwards += 1
            self.seconds += time.perf_counter() - self._started
            self._started = None

    @contextmanager
    def measure(self) -> Iterator[TargetMeter]:
        self.forwards, self.seconds, self._started = 0, 0.0, None
        handles = [
            self.target.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.target.register_forward_hook(self._post, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def peak_memory(device: torch.device, interval: float = 0.005) -> Iterator[list[float]]:
    """
    Peak memory in MB during the block, in `result[0]`: the CUDA allocator's peak, else the process RSS sampled by a
    background thread (RSS has no peak counter that can be reset per call).
    """
    result = [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            result[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return

    import psutil

    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, name="bench-rss", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], process.memory_info().rss) / 2**20


def _first_difference(tokens: torch.Tensor, reference: torch.Tensor) -> int | None:
    common = min(len(tokens), len(reference))
    mismatch = (tokens[:common] != reference[:common]).nonzero()
    if len(mismatch):
        return int(mismatch[0, 0])
    return None if len(tokens) == len(reference) else common


def sampling_kwargs(temperature: float | None) -> dict[str, Any]:
    """
    `generate` keywords of the benchmark's decoding: greedy, or plain sampling at `temperature` with top-k and top-p
    off (whatever the target's generation config says), so every strategy samples from the same distribution.
    """
    if temperature is None:
        return {"do_sample": False}
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (None: greedy decoding), got {temperature}.")
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def _generate(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    strategy: Strategy,
    max_new_tokens: int,
    decoding: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, float, float]:
    """One batch-1 call (greedy unless `decoding`, see `sampling_kwargs`); returns new tokens, seconds and peak MB."""
    input_ids = input_ids.to(target.device)[None]
    decoding = sampling_kwargs(None) if decoding is None else decoding
    # The strategy's keywords come last so that one changing the decoding itself is measured (and caught), not refused.
    kwargs = {**decoding, "max_new_tokens": max_new_tokens, **strategy.generate_kwargs}
    # every strategy, HF's included, verifies with the attention our assistants use on a CPU (plain is unaffected)
    with peak_memory(target.device) as peak, grouped_query_attention_on_cpu(target.device):
        start = time.perf_counter()
        output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        seconds = time.perf_counter() - start
    return output[0, input_ids.shape[1] :].cpu(), seconds, peak[0]


def run_benchmark(
    target: PreTrainedModel,
    prompts: Sequence[BenchPrompt | Prompt],
    strategies: Sequence[Strategy],
    max_new_tokens: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    warmup: bool = True,
    progress: bool = True,
    temperature: float | None = None,
    seed: int = 0,
) -> list[RunRecord]:
    """
    Greedy (or sampling at `temperature`), batch 1, one process. Plain `generate` runs first on every prompt and is
    the reference both for speed and for exactness; then each strategy in turn on the same prompt. A strategy whose
    call raises is recorded as a failure with its error, so one broken strategy does not lose the rest of the run.
    Under sampling every call of prompt `i` starts from `torch.manual_seed(seed + i)`, and outputs are not compared.

    Args:
        target (`PreTrainedModel`): the verifier, in eval mode on its device.
        prompts (`Sequence[BenchPrompt | Prompt]`): token ids, or text prompts together with `tokenizer`.
        strategies (`Sequence[Strategy]`): the strategies besides plain generate (added first automatically).
        max_new_tokens (`int`): new tokens per call (fewer where the target emits EOS).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): renders text prompts (chat template when it has one).
        warmup (`bool`): one short call per strategy first, so lazy initialisation is not timed.
        progress (`bool`): show a progress bar.
        temperature (`float`, *optional*): sample at this temperature (top-k and top-p off) instead of greedy.
        seed (`int`): the sampling seed of the first prompt.
    """
    names = [s.name for s in strategies]
    if PLAIN in names:
        raise ValueError(f"'{PLAIN}' is reserved for the reference run of plain generate, which is always added.")
    if len(set(names)) != len(names):
        raise ValueError(f"Strategy names must be unique, got {names}.")
    decoding = sampling_kwargs(temperature)
    sampled = decoding["do_sample"]
    encoded = encode_prompts(prompts, tokenizer)
    all_strategies = [plain_strategy(), *strategies]
    meter = TargetMeter(target)

    if warmup and encoded:
        for strategy in all_strategies:
            try:
                _generate(target, encoded[0].input_ids, strategy, min(WARMUP_TOKENS, max_new_tokens), decoding)
            except Exception as error:  # reported per prompt below
                logger.warning(f"Warm-up of strategy {strategy.name!r} failed: {type(error).__name__}: {error}")

    records: list[RunRecord] = []
    bar = tqdm(total=len(encoded) * len(all_strategies), desc="benchmark", unit="call", disable=not progress)
    for index, prompt in enumerate(encoded):
        reference: torch.Tensor | None = None
        for strategy in all_strategies:
            bar.set_postfix_str(f"{prompt.id} {strategy.name}", refresh=False)
            if sampled:
                torch.manual_seed(seed + index)
            with meter.measure():
                try:
                    tokens, seconds, peak_mb = _generate(target, prompt.input_ids, strategy, max_new_tokens, decoding)
                    error = None
                except Exception as exc:
                    if strategy.name == PLAIN:  # no reference, nothing to compare against: the run itself is broken
                        raise
                    tokens, seconds, peak_mb = torch.empty(0, dtype=torch.long), 0.0, 0.0
                    error = f"{type(exc).__name__}: {exc}"
            if reference is None:
                reference = tokens
            difference = None if error or sampled else _first_difference(tokens, reference)
            records.append(
                RunRecord(
                    strategy=strategy.name,
                    prompt_id=prompt.id,
                    category=prompt.category,
                    prompt_tokens=int(prompt.input_ids.numel()),
                    new_tokens=len(tokens),
                    seconds=seconds,
                    target_forwards=0 if error else meter.forwards,
                    target_seconds=0.0 if error else meter.seconds,
                    peak_memory_mb=peak_mb,
                    identical=error is None and not sampled and difference is None,
                    first_difference=difference,
                    error=error,
                    sampled=sampled,
                )
            )
            bar.update(1)
    bar.close()
    return records
