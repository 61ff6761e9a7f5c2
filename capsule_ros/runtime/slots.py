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
Slots: the one owner of slot residency and copy-on-write.

A slot holds a session's live buffers (the StateLayout). Two kinds of state need two kinds of
copy-on-write:

- Sequence state (KV, token journal) is append-only. A capsule at position P references the
  slot's positions ``[0, P)`` as a chain of ``Segment``s and copies nothing. Before the slot
  overwrites positions a capsule still needs (a rollback followed by new tokens, a restore of
  another capsule), exactly the doomed segments that exist nowhere else are copied into the
  capsule pool (``prepare_write``).
- Overwritten state (conv, recurrent, MTP, and the last logits) changes with every token. A
  snapshot takes the slot's current tensors by reference and marks them shared; the next
  forward pass reads them and writes its result into fresh tensors, which become the slot's
  current ones
  (``write_targets`` / ``commit_write``). A restore does the reverse: the slot takes the
  capsule's tensors by reference. Neither verb copies those bytes; the forward pass writes
  every element of its output anyway, so copy-on-write costs the next step nothing but an
  allocation.
"""

from typing import TYPE_CHECKING
import uuid

from capsule_ros.runtime.state import sequence_range, StateKind, StateLayout
import torch

if TYPE_CHECKING:
    from capsule_ros.runtime.capsule import Capsule, CapsuleStore

# Kinds written by every forward pass and captured by reference (copy-on-write).
SHARED_KINDS = frozenset([StateKind.CONV, StateKind.RECURRENT, StateKind.MTP])
# Meta buffers that every forward pass replaces whole, captured by reference as well: the last
# logits (96 KiB for SmolLM2, 485 KiB for Qwen3.5) are then neither cloned by a snapshot nor
# copied back by a rollback.
SHARED_META = frozenset(['last_logits'])


class Slot:
    """Statically allocated live buffers of one session, plus which segments sit in them."""

    def __init__(self, index: int, buffers: dict[str, torch.Tensor]):
        """Own ``buffers`` (allocated once from the StateLayout)."""
        self.index = index
        self.buffers = buffers
        self.resident: set['Segment'] = set()
        self.shared: set[str] = set()  # overwritten-state buffers a capsule references

    def __repr__(self):
        """Short form for messages."""
        return f'Slot({self.index})'


class Segment:
    """Positions ``[start, end)`` of every sequence buffer, written once by one session."""

    def __init__(self, start: int, end: int, num_bytes: int, uid: str | None = None):
        """Create an empty segment record; residency and data are filled by the owner."""
        self.uid = uid or uuid.uuid4().hex
        self.start = start
        self.end = end
        self.num_bytes = num_bytes
        self.data: dict[str, torch.Tensor] | None = None  # host pool copy
        self.residences: set[Slot] = set()
        self.capsule_refs = 0

    def read(self, layout: StateLayout) -> dict[str, torch.Tensor]:
        """Return views of this segment's bytes: the pool copy, else a slot holding it."""
        if self.data is not None:
            return self.data
        slot = next(iter(self.residences))
        return {spec.name: sequence_range(slot.buffers[spec.name], spec, self.start, self.end)
                for spec in layout.sequence_specs}


class SlotResidency:
    """Residency and copy-on-write of every slot of an engine (called under the engine lock)."""

    def __init__(self, layout: StateLayout, store: 'CapsuleStore'):
        """Track the slots of ``layout`` against the capsule pool ``store``."""
        self.layout = layout
        self.store = store
        # the state a forward pass overwrites in the model (conv, recurrent, MTP)
        self.overwritten_names = tuple(spec.name for spec in layout.fixed_specs
                                       if spec.kind in SHARED_KINDS)
        # everything captured by reference: that, and the meta buffers replaced whole
        self.shared_names = self.overwritten_names + tuple(
            spec.name for spec in layout.fixed_specs if spec.name in SHARED_META)

    # -- sequence state -------------------------------------------------------------------

    def add_segment(self, slot: Slot, start: int, end: int) -> Segment:
        """Record that ``slot`` holds a new segment ``[start, end)`` (what a snapshot adds)."""
        segment = Segment(start, end, self.layout.sequence_bytes(end - start))
        segment.residences.add(slot)
        slot.resident.add(segment)
        return segment

    def prepare_write(self, slot: Slot, position: int,
                      protect: frozenset[str] = frozenset()) -> None:
        """Copy-on-write: keep what capsules need of slot positions >= ``position``."""
        doomed = [segment for segment in slot.resident if segment.end > position]
        if not doomed:
            return
        self.store.materialize(doomed, slot, protect)
        for segment in doomed:
            segment.residences.discard(slot)
            slot.resident.discard(segment)

    def load_chain(self, slot: Slot, capsule: 'Capsule') -> int:
        """Make the capsule's sequence state resident in ``slot``; returns the bytes copied."""
        missing = [segment for segment in capsule.chain if slot not in segment.residences]
        if not missing:
            return 0
        self.prepare_write(slot, missing[0].start, frozenset([capsule.capsule_id]))
        copied = 0
        for segment in missing:
            source = segment.read(self.layout)
            for spec in self.layout.sequence_specs:
                sequence_range(slot.buffers[spec.name], spec, segment.start,
                               segment.end).copy_(source[spec.name])
            segment.residences.add(slot)
            slot.resident.add(segment)
            copied += segment.num_bytes
        return copied

    def release_slot(self, slot: Slot, protect: frozenset[str] = frozenset()) -> None:
        """Forget everything ``slot`` holds (it is about to be reused from position 0)."""
        self.prepare_write(slot, 0, protect)

    # -- overwritten state ----------------------------------------------------------------

    def share_fixed(self, slot: Slot) -> dict[str, torch.Tensor]:
        """Return the slot's overwritten-state tensors by reference, marked copy-on-write."""
        slot.shared.update(self.shared_names)
        return {name: slot.buffers[name] for name in self.shared_names}

    def adopt_fixed(self, slot: Slot, fixed: dict[str, torch.Tensor]) -> None:
        """Make a capsule's overwritten-state tensors the slot's current ones (no copy)."""
        for name in self.shared_names:
            slot.buffers[name] = fixed[name]
        slot.shared.update(self.shared_names)

    @staticmethod
    def write_targets(slot: Slot) -> dict[str, torch.Tensor]:
        """Buffers the next forward pass writes: fresh tensors in place of shared ones."""
        if not slot.shared:
            return slot.buffers
        targets = dict(slot.buffers)
        for name in slot.shared:
            targets[name] = torch.empty_like(slot.buffers[name])
        return targets

    @staticmethod
    def commit_write(slot: Slot, targets: dict[str, torch.Tensor]) -> None:
        """Make the tensors a forward pass wrote the slot's current ones."""
        if targets is not slot.buffers:
            slot.buffers.update(targets)
            slot.shared.clear()
