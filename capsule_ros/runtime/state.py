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
StateLayout: the closed set of named live buffers of a session slot.

Whatever is not in the layout is not state; whatever is state is in the layout. A capsule
captures exactly the layout: buffers with a sequence axis (``kv``) by the valid range
``[0, position)``, every other buffer whole.
"""

from dataclasses import dataclass
import enum
import hashlib
import math

import torch


class StateKind(str, enum.Enum):
    """What a live buffer holds; decides how a capsule captures it."""

    KV = 'kv'                # attention keys/values, append-only along the sequence axis
    CONV = 'conv'            # short-convolution tail state (conv hybrids)
    RECURRENT = 'recurrent'  # linear-attention / SSM state (recurrent hybrids)
    MTP = 'mtp'              # multi-token-prediction head state
    META = 'meta'            # journal, last logits, sampler and RNG state


@dataclass(frozen=True)
class BufferSpec:
    """
    One named live buffer: kind, shape, dtype, and the axis it grows along (if any).

    Buffers with a ``seq_axis`` (KV, the token journal) are valid up to the session's position
    and are captured by range; all others are captured whole.
    """

    name: str
    kind: StateKind
    shape: tuple[int, ...]
    dtype: torch.dtype
    seq_axis: int | None = None

    @property
    def num_bytes(self) -> int:
        """Bytes of the whole buffer."""
        return math.prod(self.shape) * self.dtype.itemsize

    def bytes_per_position(self) -> int:
        """Bytes one sequence position occupies (only for buffers with a sequence axis)."""
        return self.num_bytes // self.shape[self.seq_axis]


class StateLayout:
    """The closed set of buffers of one slot; allocates them and hashes their description."""

    def __init__(self, specs: list[BufferSpec]):
        """Check names are unique and sequence buffers say along which axis they grow."""
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f'duplicate buffer names in state layout: {names}')
        for spec in specs:
            if spec.kind is StateKind.KV and spec.seq_axis is None:
                raise ValueError(f'kv buffer {spec.name} needs a seq_axis')
        self.specs = tuple(specs)
        self.by_name = {spec.name: spec for spec in specs}
        self.sequence_specs = tuple(spec for spec in specs if spec.seq_axis is not None)
        self.fixed_specs = tuple(spec for spec in specs if spec.seq_axis is None)
        # asked on every snapshot: computed once
        self._bytes_per_position = sum(spec.bytes_per_position()
                                       for spec in self.sequence_specs)
        self._fixed_bytes = sum(spec.num_bytes for spec in self.fixed_specs)

    def allocate(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Allocate every buffer once, zeroed (zero is the defined initial state)."""
        return {spec.name: torch.zeros(spec.shape, dtype=spec.dtype, device=device)
                for spec in self.specs}

    def slot_bytes(self) -> int:
        """Bytes of one fully allocated slot."""
        return sum(spec.num_bytes for spec in self.specs)

    def sequence_bytes(self, num_positions: int) -> int:
        """Bytes of ``num_positions`` positions of every sequence buffer."""
        return self._bytes_per_position * num_positions

    def fixed_bytes(self) -> int:
        """Bytes of the buffers captured whole (everything without a sequence axis)."""
        return self._fixed_bytes

    def capsule_bytes(self, num_positions: int) -> int:
        """Bytes of a complete capsule at ``num_positions``, all of its segments included."""
        return self.sequence_bytes(num_positions) + self.fixed_bytes()

    def bytes_by_kind(self, num_positions: int) -> dict[StateKind, int]:
        """Bytes of a complete capsule at ``num_positions``, per kind of state."""
        totals = dict.fromkeys(StateKind, 0)
        for spec in self.specs:
            totals[spec.kind] += (spec.bytes_per_position() * num_positions
                                  if spec.seq_axis is not None else spec.num_bytes)
        return totals

    def layout_hash(self) -> str:
        """
        Short stable hash of the buffer set (part of the model fingerprint).

        The sequence axis length is left out: slots of different ``max_seq_len`` hold
        interchangeable state.
        """
        parts = []
        for spec in self.specs:
            shape = list(spec.shape)
            if spec.seq_axis is not None:
                shape[spec.seq_axis] = -1
            parts.append(f'{spec.name}:{spec.kind.value}:{shape}:{spec.dtype}:{spec.seq_axis}')
        return hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]


def sequence_range(buffer: torch.Tensor, spec: BufferSpec, start: int, end: int) -> torch.Tensor:
    """View of ``buffer`` restricted to positions ``[start, end)`` along its sequence axis."""
    return buffer.narrow(spec.seq_axis, start, end - start)
