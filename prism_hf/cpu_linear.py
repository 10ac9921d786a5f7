"""
Float32 linear layers that keep few-token forwards cheap on x86 CPUs.

Speculative decoding pays when the target verifies k draft tokens in one forward for about the price of one token.
On a GPU, or a CPU with native bfloat16, that holds. On an AVX2 CPU in float32, `torch.nn.functional.linear` goes
through MKL kernels whose cost jumps with the number of rows: on the 2-core AMD machine of our benchmarks a
Qwen2.5-Coder-1.5B forward over 4 new tokens costs 2.7x a one-token forward, so verification eats every accepted
token (see `benchmarks/results/forward-cost-*.json`).

`enable_fast_cpu_linears(model)` switches a model's float32 `nn.Linear` layers on the CPU to [`FastCpuLinear`]
(the results equal `F.linear`'s up to float32 rounding); `disable_fast_cpu_linears(model)` switches them back. It is
opt-in and changes no weights, so a model saves and loads as before. Use it for the target and the draft or small
model alike, and compare against plain `generate` with it enabled too: it is a faster kernel, not a change of method.

Inputs of up to `KERNEL_ROWS_LIMIT` rows (decoding, verification, short prompts) go to a small C++ kernel
(`csrc/few_rows_linear.cpp`, AVX2 + FMA, built with `torch.utils.cpp_extension` on first use, about 30-50 s once,
and cached per torch version). It reads each weight once for all rows, prefetching the next rows into L2, so
one-token forwards run at memory speed (plain decoding of SmolLM2-135M is about 1.7x faster than with `F.linear` on a
2-core Zen 4) and forwards over up to 8 tokens cost about 1.2x one; and every row's result is bit-identical to that
row's one-row product, so verification computes its linear layers exactly as one-token decoding does (attention still
rounds differently, so whole forwards stay only close). Where the kernel
cannot be built (no compiler, not Linux x86 with AVX2, or `PRISM_HF_CPU_KERNEL=0`), the same product is computed as
`weight @ x.T` with the rows padded to a power of two, which streams the weights once whatever the row count up to
4. Longer inputs (prefills of long prompts) keep `F.linear`, and so does anything that needs gradients.

Whether the few-row path beats `F.linear` depends on the machine: on the AVX2 AMD machine it wins at every row
count, on an AVX-512 Xeon MKL's own kernels win some shapes and row counts. So the choice is measured, not assumed:
when layers are switched, each distinct weight shape is timed against `F.linear` at row counts 1, 2, 4, ..., 256 (a
few seconds for a 1.5B model, see [`time_routing`]), and an input goes to the few-row path only where that path
measured faster for its shape and row-count bucket (`routing="measured"`, the default). The table is cached per
machine (processor, ISA, threads, torch version) in the prism_hf cache, so later processes skip the measurement.
`routing="always"` sends every input of up to `TRANSPOSED_ROWS_LIMIT` rows to the few-row path (tests and kernel
benchmarks).

`quantize_cpu_linears_int8(model)` goes further for models that only draft (an Ouroboros small model, an HF
assistant): their float32 CPU linear layers become int8 dynamically quantized ones (fbgemm kernels), which read a
quarter of the weight bytes; a Qwen2.5-Coder-0.5B forward over 1-4 tokens then costs about 2.5x less. The drafts
change a little, the output does not: the target still verifies every token. Never apply it to the target itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .reference_models import get_cache_dir

logger = logging.getLogger(__name__)

KERNEL_ROWS_LIMIT = 32  # inputs with up to this many rows go to the few-row kernel, where it is built
PADDED_ROWS_LIMIT = 32  # without it, inputs with up to this many rows are padded to a power of two
TRANSPOSED_ROWS_LIMIT = 256  # longer inputs (prefills of long prompts) keep `F.linear`, as fast or faster there
STALE_BUILD_LOCK_SECONDS = 600  # a kernel build takes 30-50 s: a lock older than this was left by an interrupted one
# Row-count buckets of the measured routing: an input of n rows falls in bucket (n - 1).bit_length(), i.e. 1, 2, 3-4,
# 5-8, ..., 129-256 rows, and is timed at the bucket's largest row count.
ROW_BUCKETS = tuple(1 << i for i in range((TRANSPOSED_ROWS_LIMIT - 1).bit_length() + 1))
ROUTING_MARGIN = 0.97  # the few-row path is used where it took under 97% of F.linear's time (timing noise)
SWEEP_ROWS_LIMIT = 8  # buckets up to this many rows are timed over sweeps through the layers (weights from memory)
SWEEP_MAX_BYTES = 1 << 30  # a sweep covers the first layers up to this many weight bytes (beyond any CPU's cache)
ROUTING_MAX_WEIGHT_BYTES = 64 << 20  # larger weights (LM heads) are timed on their first rows up to this size
ROUTING_CACHE_FILE = "cpu_linear_routing.json"
_KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "few_rows_linear.cpp"


class FastCpuLinear(nn.Linear):
    """
    An `nn.Linear` computing few-row products with the few-row kernel (or, without it, `(weight @ x.T).T` on an
    aligned, row-padded copy of `x`) for inputs of up to `TRANSPOSED_ROWS_LIMIT` rows (see the module docstring),
    `F.linear` beyond and whenever gradients are needed. With measured routing (`fast_row_buckets`, set by
    [`enable_fast_cpu_linears`]) a row-count bucket where `F.linear` measured faster for this shape keeps `F.linear`.
    """

    fast_row_buckets: tuple[bool, ...] | None = None  # per bucket of ROW_BUCKETS; None: the few-row path throughout

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # the checks are ordered cheapest first: a layer may be called a few hundred times per decoded token
        num_rows = input.numel() // self.in_features if self.in_features else 0
        buckets = self.fast_row_buckets
        if (
            num_rows > TRANSPOSED_ROWS_LIMIT
            or num_rows == 0
            or (buckets is not None and not buckets[(num_rows - 1).bit_length()])
            or (torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad))
        ):
            return _linear(input, self.weight, self.bias)
        output = _few_rows_forward(input.reshape(num_rows, self.in_features), self.weight, self.bias)
        return output.reshape(*input.shape[:-1], self.out_features)


_linear = nn.functional.linear


def _few_rows_forward(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    output = few_rows_product(rows, weight)
    return output if bias is None else output + bias


def few_rows_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` for 2-D `rows` of at most `TRANSPOSED_ROWS_LIMIT` rows by the few-row path (no bias)."""
    kernel = _few_rows_kernel() if rows.shape[0] <= KERNEL_ROWS_LIMIT else None
    if kernel is not None:
        return kernel(rows.contiguous(), weight.contiguous())
    return padded_mm_linear(rows, weight)


def padded_mm_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` as `(weight @ padded.T).T`, the rows copied into a buffer padded to a power of two (>= 2)."""
    num_rows = rows.shape[0]
    padded = 1 << max(1, (num_rows - 1).bit_length()) if num_rows <= PADDED_ROWS_LIMIT else num_rows
    buffer = rows.new_zeros(padded, rows.shape[1])
    buffer[:num_rows] = rows
    return torch.mm(weight, buffer.t()).t()[:num_rows]


def few_rows_kernel_available() -> bool:
    """
    Whether [`FastCpuLinear`] runs its few-row inputs through the compiled kernel (building it on first call, 30-50 s
    once; then cached). `False` where it cannot be built; the layers then use the slower `torch.mm` path.
    """
    return _few_rows_kernel() is not None


def _few_rows_kernel_loaded() -> bool:
    """Whether this process already loaded the kernel (for benchmark metadata; never triggers a build)."""
    return _few_rows_kernel.cache_info().currsize > 0 and _few_rows_kernel() is not None


@functools.cache
def _few_rows_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`few_rows_linear(x, weight)` from `csrc/few_rows_linear.cpp`, built once per process, or None."""
    if os.environ.get("PRISM_HF_CPU_KERNEL", "1") == "0":
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        build_directory = _kernel_build_directory()
        build_directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_build_lock(build_directory / "lock")
        logger.info("Loading prism_hf's few-row CPU kernel (built once, 30-50 s, then cached in %s).", build_directory)
        module = load(
            name="prism_hf_few_rows_linear",
            sources=[str(_KERNEL_SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_directory),
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, no Python headers...
        warnings.warn(
            f"prism_hf could not build its few-row CPU kernel ({type(error).__name__}: {error}); FastCpuLinear "
            "falls back to torch.mm, which is slower for one-token and few-token forwards. Set "
            "PRISM_HF_CPU_KERNEL=0 to skip the attempt.",
            stacklevel=2,
        )
        return None
    return module.few_rows_linear


def _kernel_build_directory() -> Path:
    """
    Where the kernel is built and cached: under `TORCH_EXTENSIONS_DIR` if set, else the prism_hf cache, in a folder
    of its own per Python and torch version (the library links against both, so an upgrade builds afresh).
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(root).expanduser() if root else get_cache_dir() / "torch_extensions"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"prism_hf_few_rows_linear-{python}-torch{torch.__version__}"


def _remove_stale_build_lock(lock: Path) -> None:
    """
    Removes torch's build lock when it is older than any build takes: a build interrupted (Ctrl-C, a killed process)
    leaves the file behind, and torch then waits on it forever, silently. A recent lock is left alone (another
    process may be building now; torch waits for it).
    """
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_SECONDS:
        warnings.warn(
            f"prism_hf removes a stale lock of its few-row kernel's build ({lock}, {age / 60:.0f} minutes old), left "
            "by an interrupted build; the build goes on.",
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)


def enable_fast_cpu_linears(model: nn.Module, routing: Literal["measured", "always"] = "measured") -> int:
    """
    Switches the float32 `nn.Linear` layers of `model` that live on the CPU to [`FastCpuLinear`]; returns how many.

    Layers of other types (quantized linears, subclasses), dtypes or devices are left alone, so enabling it on a
    GPU or bfloat16 model is a no-op. Idempotent. The first call in a process loads the few-row kernel (see
    [`few_rows_kernel_available`]).

    `routing="measured"` (default) sends an input to the few-row path only for the layer shapes and row-count buckets
    where it measured faster than `F.linear` on this machine (see the module docstring; measured on first use of a
    shape, a few seconds for a 1.5B model, then cached per machine), so the switch never makes a layer slower.
    `routing="always"` uses the few-row path for every input of up to `TRANSPOSED_ROWS_LIMIT` rows.
    """
    if routing not in ("measured", "always"):
        raise ValueError(f"routing must be 'measured' or 'always', got {routing!r}.")
    switched = _float32_cpu_linears(model, (nn.Linear,))
    for module in switched.values():
        module.__class__ = FastCpuLinear
    if switched:
        _few_rows_kernel()  # build it now rather than inside the first forward
    fast_layers = [module for module in model.modules() if type(module) is FastCpuLinear]
    table = measured_routing(fast_layers) if routing == "measured" else {}
    for module in fast_layers:
        module.fast_row_buckets = table.get(_shape_key(module))
    return len(switched)


def measured_routing(layers: Iterable[FastCpuLinear]) -> dict[str, tuple[bool, ...]]:
    """
    For each distinct weight shape among `layers` (`"out x in"`, in model order), whether the few-row path beats
    `F.linear` in each bucket of `ROW_BUCKETS` on this machine: read from the per-machine cache, or timed by
    [`time_routing`] and added to it.
    """
    layers = list(layers)
    shapes = {_shape_key(layer) for layer in layers}
    path = get_cache_dir() / ROUTING_CACHE_FILE
    machine = routing_machine_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    known = cache.get(machine, {})
    missing = {key for key in shapes if len(known.get(key, ())) != len(ROW_BUCKETS)}
    if missing:
        started = time.perf_counter()
        timed = time_routing(layers)
        known.update({key: timed[key] for key in missing})
        logger.info(
            "Timed the few-row path against F.linear for %d layer shape(s) in %.1f s (cached in %s).",
            len(missing),
            time.perf_counter() - started,
            path,
        )
        cache[machine] = known
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            partial.replace(path)
        except OSError as error:  # a read-only cache: measure again next time
            logger.warning("Could not cache the CPU linear routing in %s: %s", path, error)
    return {key: tuple(known[key]) for key in shapes}


def _shape_key(layer: nn.Linear) -> str:
    return f"{layer.out_features}x{layer.in_features}"


@torch.no_grad()
def time_routing(layers: list[nn.Linear], repeats: int = 5) -> dict[str, list[bool]]:
    """
    Per weight shape among `layers` and bucket of `ROW_BUCKETS`: whether the few-row path's fastest time is under
    `ROUTING_MARGIN` x that of `F.linear`. The fastest of `repeats` rounds, not the median: another process busy on
    the machine only ever adds time, and a decision timed under such load would be cached for the machine and slow
    every later process (a one-token MLP sent to `F.linear`, measured while another process ran, made plain decoding
    of Qwen2.5-Coder-1.5B 1.3x slower than two-token forwards on a 2-core AMD EPYC Zen 4).

    Up to `SWEEP_ROWS_LIMIT` rows a product is bound by reading its weight, so where the weight comes from decides:
    in decoding every layer runs once per token and a model's weights stream from memory, so these buckets are timed
    over sweeps through `layers` in order (as a forward runs them; the first layers up to `SWEEP_MAX_BYTES`, more
    than any CPU cache holds, and the first layer of each shape not among them), each path in whole sweeps of its
    own, a shape's time summed over its layers. Larger buckets are bound by arithmetic and are timed on each shape's
    first layer (its first rows up to `ROUTING_MAX_WEIGHT_BYTES`), the two paths alternating.
    """
    by_shape: dict[str, nn.Linear] = {}
    for layer in layers:
        by_shape.setdefault(_shape_key(layer), layer)
    swept, swept_bytes = [], 0
    for layer in layers:  # the first layers up to SWEEP_MAX_BYTES, then the first of each shape not among them
        size = layer.weight.numel() * layer.weight.element_size()
        if swept_bytes + size <= SWEEP_MAX_BYTES or not swept:
            swept.append(layer)
            swept_bytes += size
    swept_shapes = {_shape_key(layer) for layer in swept}
    swept += [layer for key, layer in by_shape.items() if key not in swept_shapes]
    paths = {
        "fast": lambda x, w, b: _few_rows_forward(x, w, b),
        "stock": lambda x, w, b: nn.functional.linear(x, w, b),
    }
    faster: dict[str, list[bool]] = {key: [] for key in by_shape}
    for rows in ROW_BUCKETS:
        inputs = {n: torch.randn(rows, n) for n in {layer.in_features for layer in layers}}
        seconds: dict[str, dict[str, list[float]]] = {key: {"fast": [], "stock": []} for key in by_shape}
        for step in range(repeats + 1):  # the first round warms up and is dropped
            for name, product in paths.items():
                if rows <= SWEEP_ROWS_LIMIT:
                    sweep = dict.fromkeys(by_shape, 0.0)
                    for layer in swept:
                        started = time.perf_counter()
                        product(inputs[layer.in_features], layer.weight, layer.bias)
                        sweep[_shape_key(layer)] += time.perf_counter() - started
                else:
                    sweep = {}
                    for key, layer in by_shape.items():
                        max_rows = max(
                            1, ROUTING_MAX_WEIGHT_BYTES // (layer.in_features * layer.weight.element_size())
                        )
                        weight = layer.weight[:max_rows]
                        bias = None if layer.bias is None else layer.bias[:max_rows]
                        started = time.perf_counter()
                        product(inputs[layer.in_features], weight, bias)
                        sweep[key] = time.perf_counter() - started
                if step:
                    for key, value in sweep.items():
                        seconds[key][name].append(value)
        for key, timings in seconds.items():
            fast, stock = (min(timings[name]) for name in ("fast", "stock"))
            faster[key].append(fast < ROUTING_MARGIN * stock)
    return faster


def routing_machine_key() -> str:
    """
    What the measured routing depends on: processor, ISA, torch threads and version, and the kernel (a digest of its
    source when it is built, so that a changed kernel is timed afresh; `none` without it).
    """
    kernel = _kernel_source_digest() if _few_rows_kernel() is not None else "none"
    return (
        f"{cpu_model_name()} | {torch.backends.cpu.get_cpu_capability()} {' '.join(cpu_isa_flags())} | "
        f"threads {torch.get_num_threads()} | torch {torch.__version__} | kernel {kernel}"
    )


@functools.cache
def _kernel_source_digest() -> str:
    """The first 12 hex digits of the SHA-256 of `csrc/few_rows_linear.cpp`."""
    return hashlib.sha256(_KERNEL_SOURCE.read_bytes()).hexdigest()[:12]


def cpu_model_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# the flags that decide CPU matmul speed: AVX2/FMA (the few-row kernel), AVX-512, and native bfloat16 / int8 units
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_isa_flags() -> list[str]:
    """Which of the ISA extensions that matter for matmuls this processor has (empty where /proc/cpuinfo is absent)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in _ISA_FLAGS if flag in present]
    return []


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def disable_fast_cpu_linears(model: nn.Module) -> int:
    """Turns the [`FastCpuLinear`] layers of `model` back into `nn.Linear`; returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is FastCpuLinear:
            module.__dict__.pop("fast_row_buckets", None)
            module.__class__ = nn.Linear
            restored += 1
    return restored


def quantize_cpu_linears_int8(model: nn.Module) -> int:
    """
    Replaces the float32 CPU `nn.Linear` (and [`FastCpuLinear`]) layers of a drafting model with int8 dynamically
    quantized linears (per-output-channel weight scales, activations quantized on the fly); returns how many.

    For small models that only propose tokens (`Ouroboros(small_model)`, `generate(assistant_model=...)`): their
    forwards get about 2.5x cheaper on x86 CPUs while the target, left in float32, verifies every token, so greedy
    output stays identical to plain `generate` and sampling stays exact. Applied to the target, it would change the
    model's output: don't. In place and not reversible (the float weights are dropped); the model is for drafting in
    this process, not for `save_pretrained`. Layers of other types, dtypes or devices are left alone, so a GPU or
    bfloat16 model returns 0. `Ouroboros(small_model_vocab=...)` works with the int8 output layer (its kept rows stay
    the same int8 rows).

    A PRISM draft (any model with a `quantize_lm_head_int8` method) with a reduced draft vocabulary gets only an int8
    copy of its slice of the target's LM head, which is most of what a draft step reads, and 1 is returned; its own
    layers stay float32 (they are small: int8 attention and MLP projections save a tenth of a SmolLM2 draft step, and
    an int8 input projection, one scale over the concatenated token embedding and target feature, halves the published
    SmolLM2 draft's step-1 agreement with the target, docs/cpu-inference.md). A draft with the target's whole LM head
    returns 0: that head is the target's.
    """
    if not any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm")):
        raise RuntimeError(
            "quantize_cpu_linears_int8 needs torch's x86/fbgemm quantized engine; this build supports "
            f"{torch.backends.quantized.supported_engines}."
        )
    quantize_lm_head = getattr(model, "quantize_lm_head_int8", None)
    if callable(quantize_lm_head):  # a PRISM draft: its draft-vocabulary head only, where it has one of its own
        if model.int8_lm_head_refusal() is not None:
            return 0
        quantize_lm_head()
        return 1
    linears = _float32_cpu_linears(model, (nn.Linear, FastCpuLinear))
    if "" in linears:  # the model is itself one linear layer: the quantizer cannot swap the root in place
        raise ValueError("quantize_cpu_linears_int8 quantizes the linear layers inside a model; got a bare nn.Linear.")
    if not linears:
        return 0
    for module in linears.values():
        module.__class__ = nn.Linear  # the quantizer swaps exact `nn.Linear`s only
    names = list(linears)
    spec = dict.fromkeys(names, torch.ao.quantization.per_channel_dynamic_qconfig)
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that torchao is its successor
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return len(names)


def _float32_cpu_linears(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> dict[str, nn.Linear]:
    """The layers of `model` whose exact type is one of `kinds` (not subclasses) with float32 weights on the CPU."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) in kinds and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
    }
