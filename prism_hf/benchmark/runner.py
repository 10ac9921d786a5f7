"""Runs generation strategies on one target, prompt by prompt and strategy by strategy (interleaved)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

PLAIN = "plain"


@dataclass
class BenchPrompt:
    """A tokenized prompt; `category` is what results are grouped by."""

    id: str
    category: str
    input_ids: torch.LongTensor


@dataclass
class Strategy:
    """A named way of calling `generate`: the extra keyword arguments it adds (e.g. `assistant_model=draft`)."""

    name: str
    generate_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """One (strategy, prompt) measurement."""

    strategy: str
    prompt_id: str
    category: str
    new_tokens: int
    seconds: float
    target_forwards: int
    target_seconds: float
    peak_memory_mb: float
    identical: bool

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def tau(self) -> float:
        """Tokens per verification forward, not counting the prefill forward and the one token it yields."""
        if self.target_forwards <= 1:
            return float(self.new_tokens)
        return (self.new_tokens - 1) / (self.target_forwards - 1)

    @property
    def draft_share(self) -> float:
        """Share of wall time spent outside target forwards (drafting and generate's own overhead)."""
        return max(0.0, 1.0 - self.target_seconds / self.seconds)


class _TargetMeter:
    """Counts and times the target's forward calls through module hooks (assistant models are not counted)."""

    def __init__(self, target: PreTrainedModel):
        self.target = target
        self.forwards = 0
        self.seconds = 0.0
        self._started = 0.0

    def _pre(self, module, args, kwargs):
        self._started = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.forwards += 1
        self.seconds += time.perf_counter() - self._started

    @contextmanager
    def measure(self) -> Iterator[_TargetMeter]:
        self.forwards, self.seconds = 0, 0.0
        pre = self.target.register_forward_pre_hook(self._pre, with_kwargs=True)
        post = self.target.register_forward_hook(self._post, with_kwargs=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Peak memory in MB during the block: CUDA allocator peak, else process RSS sampled every 5 ms."""
    result = [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    process = psutil.Process()
    stop = threading.Event()
    peak = [process.memory_info().rss]

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], process.memory_info().rss) / 2**20


def run_benchmark(
    target: PreTrainedModel,
    prompts: list[BenchPrompt],
    strategies: list[Strategy],
    max_new_tokens: int,
    warmup: bool = True,
    progress: bool = True,
) -> list[RunRecord]:
    """
    Greedy, batch 1. Plain `generate` runs first on every prompt and is the reference for exactness; then each
    strategy in turn on the same prompt, so slow drifts of machine load affect all strategies alike.
    """
    if any(s.name == PLAIN for s in strategies):
        raise ValueError(f"'{PLAIN}' is reserved for the reference run of plain generate.")
    all_strategies = [Strategy(PLAIN)] + list(strategies)
    meter = _TargetMeter(target)
    device = target.device

    def generate(prompt: BenchPrompt, strategy: Strategy, new_tokens: int) -> tuple[torch.Tensor, float, float]:
        input_ids = prompt.input_ids.to(device)[None]
        with _peak_memory(device) as peak:
            start = time.perf_counter()
            output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=new_tokens, **strategy.generate_kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        return output[0, input_ids.shape[1] :].cpu(), seconds, peak[0]

    if warmup and prompts:
        for strategy in all_strategies:
            generate(prompts[0], strategy, min(16, max_new_tokens))

    records: list[RunRecord] = []
    bar = tqdm(total=len(prompts) * len(all_strategies), desc="benchmark", disable=not progress)
    for prompt in prompts:
        reference = None
        for strategy in all_strategies:
            with meter.measure():
                tokens, seconds, peak_mb = generate(prompt, strategy, max_new_tokens)
            if reference is None:
                reference = tokens
            records.append(
                RunRecord(
                    strategy=strategy.name,
                    prompt_id=prompt.id,
                    category=prompt.category,
                    new_tokens=len(tokens),
                    seconds=seconds,
                    target_forwards=meter.forwards,
                    target_seconds=meter.seconds,
                    peak_memory_mb=peak_mb,
                    identical=bool(torch.equal(tokens, reference)),
                )
            )
            bar.update(1)
    bar.close()
    return records
