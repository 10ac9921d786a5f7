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
and cached per torch version). It reads each weight once for all rows, so one-token forwards run at memory speed (plain
decoding of Qwen2.5-Coder-1.5B is about 1.3x faster than with `F.linear`) and 4 rows cost about 1.2x one; and every
row's result is bit-identical to that row's one-row product, so verification computes its linear layers exactly as
one-token decoding does (attention still rounds differently, so whole forwards stay only close). Where the kernel
cannot be built (no compiler, not Linux x86 with AVX2, or `PRISM_HF_CPU_KERNEL=0`), the same product is computed as
`weight @ x.T` with the rows padded to a power of two, which streams the weights once whatever the row count up to
4. Longer inputs (prefills of long prompts) keep `F.linear`, and so does anything that needs gradients.

`quantize_cpu_linears_int8(model)` goes further for models that only draft (an Ouroboros small model, an HF
assistant): their float32 CPU linear layers become int8 dynamically quantized ones (fbgemm kernels), which read a
quarter of the weight bytes; a Qwen2.5-Coder-0.5B forward over 1-4 tokens then costs about 2.5x less. The drafts
change a little, the output does not: the target still verifies every token. Never apply it to the target itself.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .reference_models import get_cache_dir

logger = logging.getLogger(__name__)

KERNEL_ROWS_LIMIT = 32  # inputs with up to this many rows go to the few-row kernel, where it is built
PADDED_ROWS_LIMIT = 32  # without it, inputs with up to this many rows are padded to a power of two
TRANSPOSED_ROWS_LIMIT = 256  # longer inputs (prefills of long prompts) keep `F.linear`, as fast or faster there
STALE_BUILD_LOCK_SECONDS = 600  # a kernel build takes 30-50 s: a lock older than this was left by an interrupted one


class FastCpuLinear(nn.Linear):
    """
    An `nn.Linear` computing few-row products with the few-row kernel (or, without it, `(weight @ x.T).T` on an
    aligned, row-padded copy of `x`) for inputs of up to `TRANSPOSED_ROWS_LIMIT` rows (see the module docstring),
    `F.linear` beyond and whenever gradients are needed.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, self.in_features)
        num_rows = rows.shape[0]
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        if num_rows > TRANSPOSED_ROWS_LIMIT or needs_grad:
            return nn.functional.linear(input, self.weight, self.bias)
        kernel = _few_rows_kernel() if num_rows <= KERNEL_ROWS_LIMIT else None
        if kernel is not None:
            output = kernel(rows.contiguous(), self.weight.contiguous())
        else:
            output = padded_mm_linear(rows, self.weight)
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*input.shape[:-1], self.out_features)


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
    source = Path(__file__).resolve().parent / "csrc" / "few_rows_linear.cpp"
    try:
        from torch.utils.cpp_extension import load

        build_directory = _kernel_build_directory()
        build_directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_build_lock(build_directory / "lock")
        logger.info("Loading prism_hf's few-row CPU kernel (built once, 30-50 s, then cached in %s).", build_directory)
        module = load(
            name="prism_hf_few_rows_linear",
            sources=[str(source)],
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


def enable_fast_cpu_linears(model: nn.Module) -> int:
    """
    Switches the float32 `nn.Linear` layers of `model` that live on the CPU to [`FastCpuLinear`]; returns how many.

    Layers of other types (quantized linears, subclasses), dtypes or devices are left alone, so enabling it on a
    GPU or bfloat16 model is a no-op. Idempotent. The first call in a process loads the few-row kernel (see
    [`few_rows_kernel_available`]).
    """
    switched = _float32_cpu_linears(model, (nn.Linear,))
    for module in switched.values():
        module.__class__ = FastCpuLinear
    if switched:
        _few_rows_kernel()  # build it now rather than inside the first forward
    return len(switched)


def disable_fast_cpu_linears(model: nn.Module) -> int:
    """Turns the [`FastCpuLinear`] layers of `model` back into `nn.Linear`; returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is FastCpuLinear:
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
    """
    if not any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm")):
        raise RuntimeError(
            "quantize_cpu_linears_int8 needs torch's x86/fbgemm quantized engine; this build supports "
            f"{torch.backends.quantized.supported_engines}."
        )
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
