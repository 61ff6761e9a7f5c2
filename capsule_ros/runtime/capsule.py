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
Capsules (immutable records of a session's complete state) and the budgeted store.

Storage model. The sequence buffers (KV, token journal) of a capsule at position P are a
*chain* of segments covering ``[0, P)``. A segment is a position range written once by one
session; it lives in one or more slots ("resident") and/or as a copy in the host pool
("materialized"). A snapshot adds at most one segment, the range written since the session's
previous capsule, and copies nothing but the small fixed state, so its cost does not depend on
the context length. Children share their parent's segments (delta capsules, reference
counted). Before a slot overwrites positions that a live capsule still needs, the engine asks
the store to materialize exactly the doomed segments that exist nowhere else (copy-on-write).

Budget. ``used_bytes`` = fixed state of every capsule + every materialized segment. It never
exceeds ``budget_bytes``: room is made by first dropping pool copies that are also resident,
then evicting unpinned capsules in least-recently-used order.
"""

from collections import OrderedDict
from dataclasses import dataclass
import enum
import itertools
import threading
from typing import Callable

from capsule_ros.runtime.errors import (BudgetExceededError, InvalidArgumentError,
                                        UnknownCapsuleError)
from capsule_ros.runtime.slots import Segment, Slot
from capsule_ros.runtime.state import StateKind, StateLayout
import torch

# Id prefix of the hidden pinned capsules that hold swapped-out sessions (virtual sessions).
# No user id can start with it (ids start with a letter or a digit), and no verb shows them.
SWAP_PREFIX = '~swap-'


class Tier(str, enum.Enum):
    """Where a capsule's bytes are (the slowest part decides)."""

    SLOT = 'slot'   # every segment still sits in a slot: restore there costs no KV copy
    HOST = 'host'   # some segment lives only in the host pool
    DISK = 'disk'   # saved file only (listed by the capsule directory, not held in memory)


class EventKind(str, enum.Enum):
    """Capsule lifecycle events (one message each on ``/capsule/events``)."""

    CREATED = 'created'
    RESTORED = 'restored'
    BRANCHED = 'branched'
    EVICTED = 'evicted'
    RELEASED = 'released'
    SAVED = 'saved'
    LOADED = 'loaded'


@dataclass(frozen=True)
class CapsuleEvent:
    """One capsule event."""

    kind: EventKind
    capsule_id: str
    session_id: str = ''
    detail: str = ''
    latency_s: float = 0.0


@dataclass(frozen=True, eq=False)
class Capsule:
    """Immutable record of a session's complete restorable state at a token boundary."""

    capsule_id: str
    label: str
    session_id: str
    parent_id: str
    position: int
    fingerprint: str
    created: float
    chain: tuple[Segment, ...]
    fixed: dict[str, torch.Tensor]
    fixed_bytes: int

    @property
    def sequence_bytes(self) -> int:
        """Bytes of the whole sequence state ``[0, position)`` (KV + journal)."""
        return sum(segment.num_bytes for segment in self.chain)


@dataclass(frozen=True)
class CapsuleInfo:
    """What clients see of a capsule (the ROS layer converts it to ``CapsuleInfo.msg``)."""

    capsule_id: str
    parent_id: str
    session_id: str
    label: str
    num_tokens: int
    kv_bytes: int
    state_bytes: int  # every kind but KV: conv + recurrent + mtp + meta
    conv_bytes: int
    recurrent_bytes: int
    mtp_bytes: int
    meta_bytes: int
    shared_bytes: int
    tier: Tier
    pinned: bool
    resident_in_slot: bool
    created: float
    fingerprint: str
    children: tuple[str, ...]


class CapsuleStore:
    """
    Live capsules, their pins, LRU order, lineage, and the byte budget of the pool.

    Not thread-safe by itself: the engine calls it under its own lock.
    """

    def __init__(self, layout: StateLayout, budget_bytes: int,
                 on_event: Callable[[CapsuleEvent], None] | None = None):
        """Start empty with a budget in bytes."""
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._capsules: OrderedDict[str, Capsule] = OrderedDict()  # oldest use first
        self._pinned: set[str] = set()
        self._on_event = on_event or (lambda event: None)
        self._counter = itertools.count(1)
        self._segments_by_uid: dict[str, Segment] = {}
        self.lock = threading.RLock()

    # -- queries ----------------------------------------------------------------------------

    def __contains__(self, capsule_id: str) -> bool:
        """Whether a live capsule has this id."""
        return capsule_id in self._capsules

    def __len__(self) -> int:
        """Count live capsules (the hidden ones of swapped-out sessions excepted)."""
        return len(self.capsules())

    def get(self, capsule_id: str, touch: bool = True) -> Capsule:
        """Return the live capsule ``capsule_id`` (and mark it recently used)."""
        capsule = self._capsules.get(capsule_id)
        if capsule is None or capsule_id.startswith(SWAP_PREFIX):  # hidden ones: engine only
            raise UnknownCapsuleError(
                f'no capsule {capsule_id!r}: it was never created, or was released or evicted '
                f'(list the live ones with the list service)')
        if touch:
            self._capsules.move_to_end(capsule_id)
        return capsule

    def capsules(self, include_hidden: bool = False) -> list[Capsule]:
        """Live capsules in creation-independent LRU order (oldest use first)."""
        return [capsule for capsule_id, capsule in self._capsules.items()
                if include_hidden or not capsule_id.startswith(SWAP_PREFIX)]

    def children(self, capsule_id: str) -> tuple[str, ...]:
        """Ids of live capsules whose lineage parent is ``capsule_id``."""
        return tuple(capsule.capsule_id for capsule in self.capsules()
                     if capsule.parent_id == capsule_id)

    def info(self, capsule: Capsule) -> CapsuleInfo:
        """Describe a capsule for clients."""
        resident = all(segment.residences for segment in capsule.chain)
        by_kind = self.layout.bytes_by_kind(capsule.position)
        return CapsuleInfo(
            capsule_id=capsule.capsule_id,
            parent_id=capsule.parent_id,
            session_id=capsule.session_id,
            label=capsule.label,
            num_tokens=capsule.position,
            kv_bytes=by_kind[StateKind.KV],
            state_bytes=sum(by_kind.values()) - by_kind[StateKind.KV],
            conv_bytes=by_kind[StateKind.CONV],
            recurrent_bytes=by_kind[StateKind.RECURRENT],
            mtp_bytes=by_kind[StateKind.MTP],
            meta_bytes=by_kind[StateKind.META],
            shared_bytes=sum(segment.num_bytes for segment in capsule.chain
                             if segment.capsule_refs > 1),
            tier=Tier.SLOT if resident else Tier.HOST,
            pinned=capsule.capsule_id in self._pinned,
            resident_in_slot=resident,
            created=capsule.created,
            fingerprint=capsule.fingerprint,
            children=self.children(capsule.capsule_id),
        )

    def segment_by_uid(self, uid: str) -> Segment | None:
        """Return the live segment with this uid (used to share prefixes of loaded capsules)."""
        return self._segments_by_uid.get(uid)

    # -- ids --------------------------------------------------------------------------------

    def new_capsule_id(self, label: str) -> str:
        """Return the id of a new capsule: its label if given (must be free), else ``cap-N``."""
        if label:
            if label in self._capsules:
                raise InvalidArgumentError(
                    f'capsule id {label!r} already exists; release it first or choose another '
                    f'label')
            return label
        while True:
            candidate = f'cap-{next(self._counter)}'
            if candidate not in self._capsules:
                return candidate

    # -- mutation ---------------------------------------------------------------------------

    def add(self, capsule: Capsule, pin: bool, protect: frozenset[str] = frozenset()) -> None:
        """
        Insert a capsule; its pool segments must already be charged (see ``charge``).

        Makes room afterwards, never evicting the new capsule; if the budget cannot be met,
        the capsule is taken out again and ``BudgetExceededError`` raised.
        """
        for segment in capsule.chain:
            if segment.capsule_refs == 0:
                self._segments_by_uid[segment.uid] = segment
            segment.capsule_refs += 1
        self.used_bytes += capsule.fixed_bytes
        self._capsules[capsule.capsule_id] = capsule
        if pin:
            self._pinned.add(capsule.capsule_id)
        try:
            self.make_room(0, protect=protect | {capsule.capsule_id})
        except BudgetExceededError:
            self._remove(capsule.capsule_id)
            raise

    def check_fits(self, capsule_bytes: int, what: str) -> None:
        """Refuse a capsule that could never be held whole within the budget."""
        if capsule_bytes > self.budget_bytes:
            raise BudgetExceededError(
                f'{what} needs {_mib(capsule_bytes)} but capsules.budget_bytes is '
                f'{_mib(self.budget_bytes)}; raise the budget or keep contexts shorter')

    def discard(self, capsule_id: str) -> None:
        """Drop a hidden capsule (a swapped-out session's state) without an event."""
        self._remove(capsule_id)

    def release(self, capsule_id: str, kind: EventKind = EventKind.RELEASED) -> int:
        """Drop a capsule; returns the bytes freed (shared segments stay for the others)."""
        capsule = self.get(capsule_id, touch=False)
        before = self.used_bytes
        self._remove(capsule_id)
        self._on_event(CapsuleEvent(kind, capsule_id, capsule.session_id))
        return before - self.used_bytes

    def _remove(self, capsule_id: str) -> None:
        capsule = self._capsules.pop(capsule_id)
        self._pinned.discard(capsule_id)
        self.used_bytes -= capsule.fixed_bytes
        for segment in capsule.chain:
            segment.capsule_refs -= 1
            if segment.capsule_refs == 0:
                self._segments_by_uid.pop(segment.uid, None)
                self._drop_pool_copy(segment)

    def set_pinned(self, capsule_id: str, pinned: bool) -> None:
        """Pin (never evict) or unpin a capsule."""
        self.get(capsule_id, touch=False)
        (self._pinned.add if pinned else self._pinned.discard)(capsule_id)

    def charge(self, segment: Segment, data: dict[str, torch.Tensor]) -> None:
        """Attach a pool copy to a segment and account its bytes (room must be made first)."""
        segment.data = data
        self.used_bytes += segment.num_bytes

    def materialize(self, doomed: list[Segment], slot: Slot,
                    protect: frozenset[str] = frozenset()) -> None:
        """
        Copy-on-write: keep the doomed segments of ``slot`` that capsules still need.

        A segment needs a pool copy only if a capsule references it, it has none yet, and
        ``slot`` is its last residence. Makes room first (which may evict unpinned capsules,
        possibly the very ones that needed the bytes); raises ``BudgetExceededError`` before
        copying anything when pinned capsules need more than the budget can hold.
        """
        def needed():
            return [segment for segment in doomed
                    if segment.capsule_refs > 0 and segment.data is None
                    and segment.residences <= {slot}]

        while True:
            needing = needed()
            need_bytes = sum(segment.num_bytes for segment in needing)
            if self.used_bytes + need_bytes <= self.budget_bytes:
                break
            if not self._free_some(exclude_segments=set(doomed), exclude_capsules=protect):
                holders = sorted(capsule.capsule_id for capsule in self._capsules.values()
                                 if set(capsule.chain) & set(needing))
                raise BudgetExceededError(
                    f'the capsule budget ({_mib(self.budget_bytes)}) cannot keep the '
                    f'{_mib(need_bytes)} of KV that pinned capsule(s) {holders} need before '
                    f'{slot} is overwritten; release or unpin capsules, or raise '
                    f'capsules.budget_bytes')
        for segment in needing:
            self.charge(segment, {name: tensor.clone()
                                  for name, tensor in segment.read(self.layout).items()})

    def make_room(self, num_bytes: int, protect: frozenset[str] = frozenset()) -> None:
        """Ensure ``num_bytes`` more fit under the budget, evicting if needed; all or nothing."""
        self._apply_room(*self._plan_room(num_bytes, protect))

    def add_loaded(self, capsule: Capsule,
                   fresh: list[tuple[Segment, dict[str, torch.Tensor]]]) -> None:
        """
        Insert a capsule read from a file, all or nothing.

        ``fresh``: its segments that are not in memory yet, with their data; the rest of its
        chain are live segments it shares. What must be dropped or evicted to make room is
        planned first, so ``BudgetExceededError`` comes before anything changes; the shared
        segments are held while their other owners are evicted.
        """
        fresh_segments = {segment for segment, _ in fresh}
        shared = [segment for segment in capsule.chain if segment not in fresh_segments]
        plan = self._plan_room(
            capsule.fixed_bytes + sum(segment.num_bytes for segment in fresh_segments),
            hold=tuple(shared))
        for segment in shared:
            segment.capsule_refs += 1
        try:
            self._apply_room(*plan)
            for segment, data in fresh:
                self.charge(segment, data)
            self.add(capsule, pin=False)
        except BaseException:
            if self._capsules.get(capsule.capsule_id) is capsule:
                self._remove(capsule.capsule_id)
            for segment in fresh_segments:
                if segment.capsule_refs == 0:
                    self._drop_pool_copy(segment)
            raise
        finally:
            for segment in shared:
                segment.capsule_refs -= 1
                if segment.capsule_refs == 0:  # only after a failure: its owners were evicted
                    self._segments_by_uid.pop(segment.uid, None)
                    self._drop_pool_copy(segment)

    def _plan_room(self, num_bytes: int, protect: frozenset[str] = frozenset(),
                   hold: tuple[Segment, ...] = ()) -> tuple[list[Segment], list[str]]:
        """
        Return (pool copies to drop, capsule ids to evict) so ``num_bytes`` more fit.

        Changes nothing. Redundant pool copies (also resident in a slot) go first, then
        unpinned capsules not in ``protect`` in LRU order; segments in ``hold`` count as
        referenced once more. Raises ``BudgetExceededError`` when that cannot make room.
        """
        used = self.used_bytes
        if used + num_bytes <= self.budget_bytes:
            return [], []
        refs = {segment: segment.capsule_refs
                for capsule in self._capsules.values() for segment in capsule.chain}
        for segment in hold:
            refs[segment] = refs.get(segment, segment.capsule_refs) + 1
        pooled = {segment for segment in refs if segment.data is not None}
        drops = []
        for segment in refs:
            if used + num_bytes <= self.budget_bytes:
                break
            if segment in pooled and segment.residences:
                drops.append(segment)
                pooled.discard(segment)
                used -= segment.num_bytes
        evictions = []
        for capsule_id, capsule in self._capsules.items():
            if used + num_bytes <= self.budget_bytes:
                break
            if capsule_id in self._pinned or capsule_id in protect:
                continue
            evictions.append(capsule_id)
            used -= capsule.fixed_bytes
            for segment in capsule.chain:
                refs[segment] -= 1
                if refs[segment] == 0 and segment in pooled:
                    pooled.discard(segment)
                    used -= segment.num_bytes
        if used + num_bytes > self.budget_bytes:
            raise BudgetExceededError(
                f'the capsule budget ({_mib(self.budget_bytes)}) is full with pinned or '
                f'protected capsules ({_mib(self.used_bytes)} used, {_mib(num_bytes)} '
                f'more needed); release or unpin capsules, or raise capsules.budget_bytes')
        return drops, evictions

    def _apply_room(self, drops: list[Segment], evictions: list[str]) -> None:
        """Carry out a plan of ``_plan_room``."""
        for segment in drops:
            self._drop_pool_copy(segment)
        for capsule_id in evictions:
            self.release(capsule_id, kind=EventKind.EVICTED)

    def _free_some(self, exclude_segments: set[Segment] = frozenset(),
                   exclude_capsules: frozenset[str] = frozenset()) -> bool:
        """Free some bytes: a redundant pool copy first, else evict the LRU unpinned capsule."""
        for capsule in self._capsules.values():
            for segment in capsule.chain:
                if (segment.data is not None and segment.residences
                        and segment not in exclude_segments):
                    self._drop_pool_copy(segment)
                    return True
        for capsule_id in self._capsules:
            if capsule_id not in self._pinned and capsule_id not in exclude_capsules:
                self.release(capsule_id, kind=EventKind.EVICTED)
                return True
        return False

    def _drop_pool_copy(self, segment: Segment) -> None:
        if segment.data is not None:
            segment.data = None
            self.used_bytes -= segment.num_bytes


def _mib(num_bytes: int) -> str:
    return f'{num_bytes / (1 << 20):.1f} MiB'
