"""
Float32 linear layers that keep few-token forwards cheap on x86 CPUs.

Speculative decoding pays when the target verifies k draft tokens in one forward for about the price of one token.
On a GPU, or a CPU with native bfloat16, that holds. On an AVX2 CPU in float32, `torch.nn.functional.linear` goes
through MKL kernels whose cost jumps with the number of rows: on the 2-core AMD machine of our benchmarks a
Qwen2.5-Coder-1.5B forward over 4 new tokens costs 2.7x a one-token forward, so verification eats every accepted
token (see `benchmarks/results/forward-cost-*.json`). The same product computed as `weight @ x.T`, with the rows
padded to a power of two in a freshly allocated buffer, streams the weights once whatever the row count up to 4, and
stays cheaper up to a few hundred rows: a 4-token forward then costs what a one-token forward does, and one-token
forwards cost no more than before. Long inputs (prefills of long prompts) keep `F.linear`.

`enable_fast_cpu_linears(model)` switches a model's float32 `nn.Linear` layers on the CPU to that computation (the
results equal `F.linear`'s up to float32 rounding); `disable_fast_cpu_linears(model)` switches them back. It is
opt-in and changes no weights, so a model saves and loads as before. Use it for the target and the draft or small
model alike, and compare against plain `generate` with it enabled too: it is a faster kernel, not a change of method.
"""

from __future__ import annotations

import torch
from torch import nn

PADDED_ROWS_LIMIT = 32  # inputs with up to this many rows are padded to a power of two
TRANSPOSED_ROWS_LIMIT = 256  # longer inputs (prefills of long prompts) keep `F.linear`, as fast or faster there


class FastCpuLinear(nn.Linear):
    """
    An `nn.Linear` computing `(weight @ x.T).T` on an aligned, row-padded copy of `x` for inputs of up to
    `TRANSPOSED_ROWS_LIMIT` rows (see the module docstring), `F.linear` beyond.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, self.in_features)
        num_rows = rows.shape[0]
        if num_rows > TRANSPOSED_ROWS_LIMIT:
            return nn.functional.linear(input, self.weight, self.bias)
        padded = 1 << max(1, (num_rows - 1).bit_length()) if num_rows <= PADDED_ROWS_LIMIT else num_rows
        buffer = rows.new_zeros(padded, self.in_features)
        buffer[:num_rows] = rows
        output = torch.mm(self.weight, buffer.t()).t()[:num_rows]
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*input.shape[:-1], self.out_features)


def enable_fast_cpu_linears(model: nn.Module) -> int:
    """
    Switches the float32 `nn.Linear` layers of `model` that live on the CPU to [`FastCpuLinear`]; returns how many.

    Layers of other types (quantized linears, subclasses), dtypes or devices are left alone, so enabling it on a
    GPU or bfloat16 model is a no-op. Idempotent.
    """
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = FastCpuLinear
            switched += 1
    return switched


def disable_fast_cpu_linears(model: nn.Module) -> int:
    """Turns the [`FastCpuLinear`] layers of `model` back into `nn.Linear`; returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is FastCpuLinear:
            module.__class__ = nn.Linear
            restored += 1
    return restored
