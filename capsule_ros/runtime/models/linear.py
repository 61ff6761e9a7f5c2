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
Linear layers shared by every model family: dense, oneDNN-packed bf16, or 4-bit for decode.

bf16 on x86: oneDNN-packed weights run batch-1 decode near memory bandwidth and batched
prefill about 1.8x faster than plain bf16 matmuls on this CPU class. A quantized linear keeps
the int4 groups for one token (decode) and their bf16 expansion for many (prefill): the same
weights, see capsule_ros.runtime.quantization.
"""

from dataclasses import dataclass

from capsule_ros.runtime.config import MAX_DRAFT_TOKENS
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.quantization import (int4_linear, int4_supported, Int4Weight,
                                              quantize_int4)
import torch
import torch.nn.functional as F  # noqa: N812


@dataclass(frozen=True)
class PreparedLinear:
    """One linear weight ``[N, K]`` as the forward pass multiplies it."""

    dense: torch.Tensor  # [N, K] (or oneDNN's packed layout of it): prefill, and decode if no int4
    int4: Int4Weight | None = None  # decode weights when quantized
    bias: torch.Tensor | None = None  # [N]


# Up to this many rows (a verify pass of speculative decoding: a token and its drafts) take the
# decode kernels. The 4-bit kernel computes every row exactly as it computes a single row, so
# a verify pass multiplies like that many one-token decode steps, bit for bit.
DECODE_KERNEL_MAX_ROWS = MAX_DRAFT_TOKENS + 1


class LinearFactory:
    """Turns fp32 source weights into ``PreparedLinear`` and multiplies by them."""

    def __init__(self, dtype: torch.dtype, device: torch.device, quantization: str = 'none'):
        """
        Decide packing and quantization once for a model.

        ``quantization``: ``none``; ``int4`` streams every prepared linear as 4-bit groups in
        decode; ``auto`` does so in bf16 on CPU for the weights already on a 4-bit grid (GGUF
        Q4_1), where it loses nothing beyond bf16 rounding of each group's scale and zero.
        """
        if quantization == 'auto' and (dtype != torch.bfloat16 or device.type != 'cpu'):
            quantization = 'none'
        if quantization == 'int4' and device.type != 'cpu':
            raise InvalidArgumentError(
                'parameter model.quantization: int4 runs on CPU only; use auto or none on '
                f'{device.type}')
        self.dtype = dtype
        self.device = device
        self.quantization = quantization
        self.packed = (dtype == torch.bfloat16 and device.type == 'cpu'
                       and torch.backends.mkldnn.is_available())
        self.num_prepared = 0
        self.num_int4 = 0

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                quantize: bool = True) -> PreparedLinear:
        """
        Prepare ``weight`` [N, K] (any dtype; fp32 source preferred) for this model.

        ``quantize=False`` keeps it dense and out of the int4 count (output heads, tiny
        projections).
        """
        weight = weight.to(device=self.device, dtype=torch.float32)
        if bias is not None:
            bias = bias.to(device=self.device, dtype=self.dtype).contiguous()
        if quantize:
            self.num_prepared += 1
        if quantize and self.quantization != 'none' and int4_supported(weight, self.device):
            quantized = quantize_int4(weight, self.dtype,
                                      only_on_grid=self.quantization == 'auto')
            if quantized is not None:
                self.num_int4 += 1
                # prefill multiplies the same weights as decode: the int4 grid's expansion
                return PreparedLinear(self.pack(quantized.dequantized.to(self.dtype)),
                                      quantized.weight, bias)
        return PreparedLinear(self.pack(weight.to(self.dtype).contiguous()), None, bias)

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` [N, K] (already in the model dtype) in the layout ``apply`` wants."""
        if self.packed:
            return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        return weight

    def apply(self, x: torch.Tensor, linear: PreparedLinear) -> torch.Tensor:
        """``x @ W.T + b`` for x [M, K]; returns [M, N]."""
        if linear.int4 is not None and x.shape[0] <= DECODE_KERNEL_MAX_ROWS:  # 4-bit weights
            out = int4_linear(x, linear.int4)
            return out if linear.bias is None else out + linear.bias
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, linear.dense, linear.bias, 'none',
                                                      [None], '')
        return F.linear(x, linear.dense, linear.bias)

    def describe(self) -> str:
        """Describe the weights decode runs on (part of the fingerprint); not the mode asked."""
        return f'{self.dtype} int4={self.num_int4}/{self.num_prepared}'
