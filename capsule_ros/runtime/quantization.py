# Copyright 2026 The capsule_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
4-bit weights for decode: groups of 32 input features, each ``w = (q - 8) * scale + zero``.

Batch-1 decode is memory-bound: every token streams every weight once. torch's CPU int4 kernel
(``_weight_int4pack_mm_for_cpu``) streams 4.5 bits per weight instead of bf16's 16, about 3x
faster for a 135M model whose weights do not fit in cache. Batched prefill is compute-bound and
runs faster on dense bf16, so a quantized linear keeps both: the packed int4 groups for one
token, and their bf16 expansion for many (the same weights, up to bf16 rounding).

GGUF Q4_1 (the bundled model's format) stores exactly this grid: blocks of 32 with a scale and
a minimum. Its dequantized weights are found again exactly by a min/max quantization of each
group, so ``quantization: auto`` uses int4 only where a weight already lies on such a grid
(checked per weight; nothing is lost beyond the bf16 rounding of each group's scale and zero,
as the dense bf16 path rounds every weight) and ``int4`` forces it (round-to-nearest, lossy).
"""

from dataclasses import dataclass

import torch

GROUP_SIZE = 32
LEVELS = 15  # q in [0, 15]
# A weight lies on a 4-bit grid when every value is within this fraction of a step of one.
ON_GRID_TOLERANCE = 1e-3
QUANTIZATION_MODES = ('auto', 'int4', 'none')


@dataclass(frozen=True)
class Int4Weight:
    """A linear weight ``[N, K]`` in torch's CPU int4 layout: what decode streams."""

    packed: torch.Tensor  # [N, K / 2] uint8, torch's CPU int4 packing
    scales_and_zeros: torch.Tensor  # [K / G, N, 2] in the activation dtype


@dataclass(frozen=True)
class Int4Quantization:
    """The result of quantizing one weight: the int4 weight, its expansion, the grid check."""

    weight: Int4Weight
    dequantized: torch.Tensor  # [N, K] fp32: (q - 8) * scale + zero, what the kernel computes
    on_grid: bool  # the source weight was already exactly on this grid (fp32 scales)


def int4_supported(weight: torch.Tensor, device: torch.device) -> bool:
    """Return whether ``weight`` ([N, K]) can use the CPU int4 kernel."""
    return (device.type == 'cpu' and weight.dim() == 2 and weight.shape[1] % GROUP_SIZE == 0
            and weight.shape[0] % 16 == 0  # the packing works on tiles of 16 rows
            and hasattr(torch.ops.aten, '_weight_int4pack_mm_for_cpu'))


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype,
                  only_on_grid: bool = False) -> Int4Quantization | None:
    """
    Quantize ``weight`` [N, K] by min/max per group of 32 along K.

    With ``only_on_grid``, return None (and pack nothing) when the weight is not on a grid.
    """
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // GROUP_SIZE, GROUP_SIZE)  # [N, K/G, G]
    minimum = groups.amin(dim=-1, keepdim=True)  # [N, K/G, 1]
    scale = (groups.amax(dim=-1, keepdim=True) - minimum) / LEVELS
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    steps = (groups - minimum) / safe_scale  # [N, K/G, G], in [0, 15]
    q = steps.round().clamp(0, LEVELS)
    on_grid = bool((steps - q).abs().max() <= ON_GRID_TOLERANCE)
    if only_on_grid and not on_grid:
        return None
    # torch's layout centres q: w = (q - 8) * scale + zero, so zero = minimum + 8 * scale
    scale = scale.to(dtype)
    zero = (minimum + 8 * scale.float()).to(dtype)
    dequantized = (q - 8) * scale.float() + zero.float()  # [N, K/G, G]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.reshape(rows, columns).to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale[..., 0], zero[..., 0]], dim=-1)  # [N, K/G, 2]
    return Int4Quantization(
        weight=Int4Weight(packed=packed,
                          scales_and_zeros=scales_and_zeros.transpose(0, 1).contiguous()),
        dequantized=dequantized.reshape(rows, columns), on_grid=on_grid)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """``x @ W.T`` for x [M, K] in the activation dtype; returns [M, N]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, weight.packed, GROUP_SIZE, weight.scales_and_zeros)
