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
PolicyEngine: sessions over static slots, prefill/decode/generate, and the capsule verbs.

Concurrency: one engine lock guards the session table, the capsule store and slot residency
(held for bookkeeping and memory copies, never across a forward pass). Each session has a busy
lock: an operation on a session that another operation holds fails fast with
``SessionBusyError``; other sessions are not blocked.
"""

from dataclasses import dataclass, replace
import hashlib
import itertools
from pathlib import Path
import threading
import time
from typing import Callable, Iterable
import uuid

from capsule_ros.runtime import backends, loader, persist
from capsule_ros.runtime.capsule import (Capsule, CapsuleEvent, CapsuleInfo, CapsuleStore,
                                         EventKind, SWAP_PREFIX)
from capsule_ros.runtime.chat import ChatFormatter, Role, TurnState
from capsule_ros.runtime.config import (MAX_DRAFT_TOKENS, PolicyConfig, SamplingConfig,
                                        SpeculativeMode)
from capsule_ros.runtime.errors import (BudgetExceededError,
                                        check_plain_name, ContextFullError,
                                        CorruptCapsuleError,
                                        InvalidArgumentError, PrefillCanceledError,
                                        SessionBusyError, UnknownSessionError)
from capsule_ros.runtime.generate import (decode_loop, DecodeRequest, GenerationResult,
                                          StopReason)
from capsule_ros.runtime.models import registry
from capsule_ros.runtime.models.mtp import has_mtp_head, MtpHead
from capsule_ros.runtime.sampling import new_generator
from capsule_ros.runtime.slots import Segment, Slot, SlotResidency
from capsule_ros.runtime.speculative import (MtpDrafter, PromptLookupDrafter, SlotVerifier,
                                             Speculation)
from capsule_ros.runtime.state import BufferSpec, StateKind, StateLayout

import torch

MAX_BRANCHES = 64
MAX_OPEN_SESSIONS = 4096  # sessions beyond the slots live in the capsule pool, under its budget
# meta scalars: [position, turn state, has last logits, sampler top_k, sampler seed,
# drafts verified, drafts accepted] (the last two: the session's speculation counters)
(SCALAR_POSITION, SCALAR_TURN, SCALAR_HAS_LOGITS, SCALAR_TOP_K, SCALAR_SEED, SCALAR_DRAFTED,
 SCALAR_ACCEPTED) = range(7)
NUM_SCALARS = 7
# sampler floats: [temperature, top_p]
SAMPLER_TEMPERATURE, SAMPLER_TOP_P = range(2)


@dataclass(frozen=True)
class SessionMeta:
    """The session scalars a capsule's meta state encodes (``scalars`` and ``sampler``)."""

    position: int
    turn: TurnState
    has_logits_flag: int  # 0 or 1 when valid; kept raw so a load can check it
    sampling: SamplingConfig
    drafted: int  # the session's speculation counters
    accepted: int

    @classmethod
    def decode(cls, fixed: dict[str, torch.Tensor]) -> 'SessionMeta':
        """Read them from fixed state; ValueError when a turn or sampling value is invalid."""
        scalars = fixed['scalars'].tolist()
        sampler = fixed['sampler'].tolist()
        return cls(scalars[SCALAR_POSITION], TurnState(scalars[SCALAR_TURN]),
                   scalars[SCALAR_HAS_LOGITS],
                   SamplingConfig(temperature=sampler[SAMPLER_TEMPERATURE],
                                  top_k=scalars[SCALAR_TOP_K], top_p=sampler[SAMPLER_TOP_P],
                                  seed=scalars[SCALAR_SEED]),
                   scalars[SCALAR_DRAFTED], scalars[SCALAR_ACCEPTED])


@dataclass(frozen=True)
class RestoreResult:
    """Outcome of ``restore``."""

    session_id: str
    num_tokens: int
    copied_bytes: int
    latency_s: float


@dataclass(frozen=True)
class SaveResult:
    """Outcome of ``save``."""

    path: str
    bytes_written: int
    latency_s: float


class Session:
    """
    One conversation: a position, its chain of segments, its RNG and defaults, and its state.

    The state sits in a slot while the session is resident, or in a hidden pinned capsule
    (``parked``) while it is swapped out: slots are a cache of sessions, not a limit.
    """

    def __init__(self, session_id: str, slot: Slot | None, sampling: SamplingConfig):
        """Start empty at position 0."""
        self.session_id = session_id
        self.slot = slot
        self.parked: Capsule | None = None  # the swapped-out state when ``slot`` is None
        self.last_used = 0  # LRU stamp: the least recently used idle session is swapped out
        # ids repeat (s0 in every process, a name reused after close): what a saved capsule
        # records as its session's identity is this, so a load never claims another session
        self.incarnation = uuid.uuid4().hex
        self.position = 0
        self.turn = TurnState.IDLE
        self.has_logits = False
        self.chain: tuple[Segment, ...] = ()  # describes slot positions [0, chain_end)
        self.parent_id = ''  # lineage parent for the next snapshot
        self.sampling = sampling
        self.generator = new_generator(max(sampling.seed, 0))
        self.drafted = self.accepted = 0  # speculation: drafts verified and accepted, in all
        self.busy = threading.Lock()

    @property
    def chain_end(self) -> int:
        """First position not described by the chain."""
        return self.chain[-1].end if self.chain else 0


class PolicyEngine:
    """The policy LLM with snapshot / restore / branch over its complete execution state."""

    def __init__(self, config: PolicyConfig | None = None,
                 progress: loader.ProgressCallback | None = loader.print_progress,
                 on_event: Callable[[CapsuleEvent], None] | None = None):
        """Load the model, allocate ``max_sessions`` slots and an empty capsule store."""
        self.config = config or PolicyConfig()
        report = progress or (lambda line: None)
        started = time.monotonic()
        backend = self.config.backend
        if backend.num_threads:
            torch.set_num_threads(backend.num_threads)
        self.device = torch.device(backend.device)
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise InvalidArgumentError('parameter backend.device: CUDA is not available here')
        self.dtype = getattr(torch, self.config.model.dtype)
        cache_dir = Path(self.config.model.cache_dir) if self.config.model.cache_dir else None
        files = loader.resolve_model(self.config.model.path, cache_dir, progress)
        report(f'loading weights from {files.directory}')
        hf_config, weights = loader.load_hf_directory(files.directory)
        self.model_config = registry.config_from_hf(hf_config)
        max_seq_len = self.config.engine.max_seq_len
        if max_seq_len > self.model_config.max_position_embeddings:
            raise InvalidArgumentError(
                f"parameter engine.max_seq_len: {max_seq_len} exceeds the model's "
                f'{self.model_config.max_position_embeddings} positions')
        self.model = backends.build_model(self.config, self.model_config, weights,
                                          files.weights_sha256, self.dtype, self.device,
                                          max_seq_len, cache_dir or loader.default_cache_dir(),
                                          progress)
        # the MTP head and its state only where MTP drafts are asked for: keeping its state
        # costs one more decoder layer per forward pass
        self.checkpoint_has_mtp = has_mtp_head(weights)
        self.mtp = None
        if self.config.generation.speculative == SpeculativeMode.MTP.value:
            if not self.checkpoint_has_mtp:
                raise InvalidArgumentError(self._no_mtp_head())
            if backend.kind != 'torch':
                raise InvalidArgumentError(
                    f'parameter generation.speculative: mtp runs on backend.kind torch (the '
                    f'{backend.kind} graph returns no hidden states); use lookup or off')
            self.mtp = MtpHead(self.model, weights)
        del weights
        self.tokenizer = loader.load_tokenizer(files.directory)
        self.chat = ChatFormatter(self.tokenizer)
        self.eos_token_ids = self._eos_token_ids(hf_config)
        self.max_seq_len = max_seq_len
        vocab_size = self.model_config.vocab_size
        rng_bytes = torch.Generator().get_state().numel()
        mtp_specs = self.mtp.state_specs() if self.mtp is not None else []
        self.layout = StateLayout(self.model.state_specs() + mtp_specs + [
            BufferSpec('tokens', StateKind.META, (max_seq_len,), torch.int64, seq_axis=0),
            # the model computes logits in its own dtype, so storing them in it is lossless
            BufferSpec('last_logits', StateKind.META, (vocab_size,), self.dtype),
            BufferSpec('rng_state', StateKind.META, (rng_bytes,), torch.uint8),
            BufferSpec('scalars', StateKind.META, (NUM_SCALARS,), torch.int64),
            BufferSpec('sampler', StateKind.META, (2,), torch.float64),
        ])
        self.fingerprint = self._fingerprint(files.weights_sha256)
        report(f'allocating {self.config.engine.max_sessions} slots of '
               f'{self.layout.slot_bytes() / (1 << 20):.0f} MiB')
        # the backend's own device memory where it has one (TensorRT: pycuda), else torch's
        allocate = getattr(self.model, 'allocate', None) or (
            lambda layout: layout.allocate(self.device))
        self._free_slots = [Slot(index, allocate(self.layout))
                            for index in range(self.config.engine.max_sessions)]
        self._listeners: list[Callable[[CapsuleEvent], None]] = [on_event] if on_event else []
        self.store = CapsuleStore(self.layout, self.config.capsules.budget_bytes,
                                  on_event=self._emit)
        self._lock = self.store.lock
        self.residency = SlotResidency(self.layout, self.store)
        self._sessions: dict[str, Session] = {}
        self._session_counter = itertools.count()
        self._use_counter = itertools.count(1)
        self.model_name = files.source
        swept = persist.sweep(self.config.capsules.directory())  # what crashed saves left
        if swept:
            report(f'removed {len(swept)} leftover(s) of interrupted saves from the capsule '
                   f'directory')
        self.last_latencies: dict[str, float] = {}
        self.speculation_totals = {'drafted': 0, 'accepted': 0}  # drafts of every generation
        report(f'model ready in {time.monotonic() - started:.1f} s '
               f'({self.model.weights_format}, fingerprint {self.fingerprint})')

    # -- identity ---------------------------------------------------------------------------

    def _fingerprint(self, weights_sha256: str) -> str:
        parts = [weights_sha256, self.model.family, self.model_config.hf_config_json,
                 self.model.weights_format,
                 self.config.backend.kind, self.device.type, self.layout.layout_hash()]
        return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:32]

    def _eos_token_ids(self, hf_config: dict) -> frozenset[int]:
        ids = hf_config.get('eos_token_id')
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def add_listener(self, listener: Callable[[CapsuleEvent], None]) -> None:
        """Receive every capsule event."""
        self._listeners.append(listener)

    def _emit(self, event: CapsuleEvent) -> None:
        for listener in self._listeners:
            listener(event)

    # -- sessions ---------------------------------------------------------------------------

    def create_session(self, session_id: str = '', sampling: SamplingConfig | None = None,
                       system_prompt: bool = True) -> str:
        """
        Open a session in a free slot; prefill the configured system prompt if any.

        All or nothing: if the prefill fails (a prompt longer than the slots, a busy engine),
        the session is closed again and the error raised.
        """
        with self._lock:
            session = self._new_session(session_id, sampling)
        prompt = self.config.engine.system_prompt
        if prompt and system_prompt:
            try:
                self.append(session.session_id, prompt, role=Role.SYSTEM)
            except BaseException:
                with self._lock:
                    if self._sessions.get(session.session_id) is session:
                        self._discard_session(session)
                raise
        return session.session_id

    def _new_session(self, session_id: str, sampling: SamplingConfig | None,
                     protect: frozenset[str] = frozenset()) -> Session:
        if session_id:
            check_plain_name(session_id, 'session id')
            if session_id in self._sessions:
                raise InvalidArgumentError(f'session {session_id!r} already exists')
        else:
            session_id = next(candidate for candidate in
                              (f's{index}' for index in self._session_counter)
                              if candidate not in self._sessions)
        if len(self._sessions) >= MAX_OPEN_SESSIONS:
            raise BudgetExceededError(
                f'{MAX_OPEN_SESSIONS} sessions are open; close sessions that are done')
        session = Session(session_id, self._claim_slot(protect=protect),
                          sampling or self.config.generation.sampling())
        session.last_used = next(self._use_counter)
        self._sessions[session_id] = session
        return session

    # -- virtual sessions: slots are a cache --------------------------------------------------

    def _claim_slot(self, exclude: Session | None = None,
                    protect: frozenset[str] = frozenset()) -> Slot:
        """
        Return a free slot, swapping out the least recently used idle session if needed.

        ``protect``: capsules the caller is about to use, never evicted to make room.
        """
        if self._free_slots:
            return self._free_slots.pop(0)
        idle = sorted((session for session in self._sessions.values()
                       if session.slot is not None and session is not exclude
                       and not session.busy.locked()), key=lambda session: session.last_used)
        if not idle:
            raise BudgetExceededError(
                f'all {self.config.engine.max_sessions} session slots are busy (generating or '
                f'in another call); wait for one to finish, cancel a generation, or raise '
                f'engine.max_sessions')
        victim = idle[0]
        with self._hold(victim):
            return self._swap_out(victim, protect)

    def _swap_out(self, session: Session, protect: frozenset[str] = frozenset()) -> Slot:
        """Park ``session``'s state as a hidden pinned capsule and free its slot."""
        started = time.perf_counter()
        parked = self._capture(session, SWAP_PREFIX + session.session_id, label='',
                               parent_id=session.parent_id)
        try:
            self.store.add(parked, pin=True, protect=protect)
            # copies the KV only this slot holds
            self.residency.release_slot(session.slot, protect | {parked.capsule_id})
        except BudgetExceededError as error:
            if parked.capsule_id in self.store:
                self.store.discard(parked.capsule_id)
            raise BudgetExceededError(
                f'every session slot is in use and the capsule budget cannot hold an idle '
                f'session swapped out of one ({error}); close sessions that are done or raise '
                f'capsules.budget_bytes') from None
        slot, session.slot, session.parked = session.slot, None, parked
        self.last_latencies['swap_out'] = time.perf_counter() - started
        return slot

    def _resident(self, session: Session, keep_state: bool = True,
                  protect: frozenset[str] = frozenset()) -> Slot:
        """Give ``session`` (held by the caller) a slot; swap its state back in if it is parked."""
        if session.slot is not None:
            return session.slot
        started = time.perf_counter()
        parked = session.parked
        slot = self._claim_slot(session, protect | {parked.capsule_id})
        session.slot = slot
        try:
            if keep_state:
                parent_id = session.parent_id
                self._enter(session, parked)
                session.parent_id = parent_id
        except BaseException:
            self.residency.release_slot(slot)
            self._free_slots.append(slot)
            session.slot = None
            raise
        session.parked = None
        self.store.discard(parked.capsule_id)
        self.last_latencies['swap_in'] = time.perf_counter() - started
        return session.slot

    def _state_view(self, session: Session, name: str) -> torch.Tensor:
        """Return buffer ``name`` of a session wherever it is (slot or parked capsule)."""
        if session.slot is not None:
            return session.slot.buffers[name]
        if name in session.parked.fixed:
            return session.parked.fixed[name]
        return torch.cat([segment.read(self.layout)[name] for segment in session.parked.chain],
                         dim=self.layout.by_name[name].seq_axis)

    def close_session(self, session_id: str) -> None:
        """Close a session and free its slot; capsules made in it stay restorable."""
        with self._lock:
            session = self._session(session_id)
            with self._hold(session):
                self._discard_session(session)

    def sessions(self) -> list[str]:
        """Ids of open sessions."""
        with self._lock:
            return list(self._sessions)

    def session_position(self, session_id: str) -> int:
        """Return the number of tokens in the session."""
        with self._lock:
            return self._session(session_id).position

    def session_tokens(self, session_id: str) -> list[int]:
        """Return the session's token journal."""
        with self._lock:
            session = self._session(session_id)
            if not session.position:
                return []
            return self._state_view(session, 'tokens')[:session.position].tolist()

    def session_speculation(self, session_id: str) -> tuple[int, int]:
        """Return the drafts the session has verified and accepted (carried by its capsules)."""
        with self._lock:
            session = self._session(session_id)
            return session.drafted, session.accepted

    def session_logits(self, session_id: str) -> torch.Tensor:
        """Return a copy of the session's last logits [V] (what the next token is sampled from)."""
        with self._lock:
            session = self._session(session_id)
            if not session.has_logits:
                raise InvalidArgumentError(f'session {session_id!r} is empty')
            return self._state_view(session, 'last_logits').to(torch.float32, copy=True)

    def _session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(
                f'no session {session_id!r}; open sessions: {sorted(self._sessions) or "none"}')
        return session

    def _hold(self, session: Session, resident: bool = False):
        """
        Take the session's busy lock (callers hold the engine lock) and mark it used.

        With ``resident`` also give it a slot (swapping its state in if it was swapped out).
        """
        if not session.busy.acquire(blocking=False):
            raise SessionBusyError(
                f'session {session.session_id!r} is busy (a generation or another operation '
                f'runs on it); retry when it finishes or cancel the generation')
        session.last_used = next(self._use_counter)
        if resident:
            try:
                self._resident(session)
            except BaseException:
                session.busy.release()
                raise
        return _Release(session.busy)

    # -- forward ----------------------------------------------------------------------------

    def _run(self, session: Session, token_ids: list[int],
             progress: Callable[[int, int], None] | None = None,
             cancel: threading.Event | None = None) -> None:
        """
        Prefill ``token_ids`` in chunks at the session's position (caller holds session).

        ``cancel`` is checked before every chunk: once set, ``PrefillCanceledError`` is raised
        with the session at the clean boundary after the last whole chunk.
        """
        if not token_ids:
            return
        vocab_size = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            raise InvalidArgumentError(f'token ids must be in [0, {vocab_size})')
        if session.position + len(token_ids) > self.max_seq_len:
            raise ContextFullError(
                f'session {session.session_id!r} holds {session.position} tokens; '
                f'{len(token_ids)} more exceed engine.max_seq_len={self.max_seq_len}')
        with self._lock:
            self.residency.prepare_write(session.slot, session.position)
        chunk = self.config.engine.prefill_chunk
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        for offset in range(0, len(token_ids), chunk):
            if cancel is not None and cancel.is_set():
                raise PrefillCanceledError(session.session_id, offset, len(token_ids))
            piece = ids[offset:offset + chunk]
            self._forward(session, piece)
            if progress:
                progress(offset + piece.shape[0], len(token_ids))

    def _forward(self, session: Session, ids: torch.Tensor,
                 all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        One forward pass of ``ids`` [S] at the session's position; the session advances.

        Returns fp32 logits [S, V] with ``all_logits``, else [V] (the last row becomes the
        session's last logits either way), and with an MTP head the final hidden states
        [S, D] (the MTP state has advanced over ``ids`` as well), else None.
        """
        slot = session.slot
        start = session.position
        targets = self.residency.write_targets(slot)
        hidden = None
        if self.mtp is None:
            logits = self.model.forward(ids, start, slot.buffers, all_logits=all_logits,
                                        out_state=targets)
        else:
            logits, hidden = self.model.forward(ids, start, slot.buffers,
                                                all_logits=all_logits, out_state=targets,
                                                return_hidden=True)
            self.mtp.advance(ids, hidden, start, slot.buffers, targets)
        self.residency.commit_write(slot, targets)
        buffers = slot.buffers
        buffers['tokens'][start:start + ids.shape[0]] = ids
        buffers['last_logits'].copy_(logits[-1] if all_logits else logits)
        session.position = start + ids.shape[0]
        session.has_logits = True
        return logits, hidden

    def _no_mtp_head(self) -> str:
        if self.checkpoint_has_mtp:
            return ('speculative mtp: the MTP head keeps its state from the first token on, '
                    'so it is set up at configure: set parameter generation.speculative: mtp')
        return (f'parameter generation.speculative: mtp needs a multi-token-prediction head, '
                f'and this {self.model.family} checkpoint has none (no mtp.* weights); use '
                f'lookup or off')

    def _speculation(self, session: Session, mode: SpeculativeMode, num_draft_tokens: int,
                     sampling: SamplingConfig) -> Speculation | None:
        """Drafting, verification and rollback for one generation in ``session`` (held)."""
        if mode is SpeculativeMode.OFF or num_draft_tokens == 0:
            return None
        if mode is SpeculativeMode.MTP and self.mtp is None:
            raise InvalidArgumentError(self._no_mtp_head())
        slot = session.slot
        verifier = SlotVerifier(session, self.residency, self._lock, self._forward)
        if mode is SpeculativeMode.MTP:
            drafter = MtpDrafter(self.mtp, lambda: slot.buffers, lambda: session.position,
                                 verifier.prepare_write, sampling, session.generator)
        else:
            drafter = PromptLookupDrafter(slot.buffers['tokens'][:session.position].tolist())
        return Speculation(drafter, num_draft_tokens, verifier.verify, verifier.keep)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in the text are recognized)."""
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    def append(self, session_id: str, text: str | None = None,
               tokens: Iterable[int] | None = None, role: Role | str = Role.USER,
               progress: Callable[[int, int], None] | None = None,
               cancel: threading.Event | None = None) -> int:
        """
        Add a message (formatted by the chat template) or raw tokens; returns the count.

        ``tokens`` and ``Role.RAW`` text go in verbatim and leave the chat turn state as is.
        Setting ``cancel`` stops the prefill between chunks (``PrefillCanceledError``).
        """
        role = Role(role)
        if (text is None) == (tokens is None):
            raise InvalidArgumentError('append needs exactly one of text or tokens')
        with self._lock:
            session = self._session(session_id)
            hold = self._hold(session, resident=True)
        with hold:
            if tokens is not None:
                token_ids = [int(token) for token in tokens]
            else:
                formatted = self.chat.message_text(role, text, session.position == 0,
                                                   session.turn)
                token_ids = self.tokenize(formatted)
            started = time.perf_counter()
            self._run(session, token_ids, progress, cancel)
            self.last_latencies['append'] = time.perf_counter() - started
            if tokens is None and role is not Role.RAW:
                session.turn = TurnState.IDLE
            return len(token_ids)

    def generate(self, session_id: str, max_new_tokens: int,
                 sampling: SamplingConfig | None = None, stop: Iterable[str] = (),
                 on_token: Callable[[int, str], None] | None = None,
                 cancel: threading.Event | None = None, reply: bool = True,
                 speculative: SpeculativeMode | str | None = None,
                 num_draft_tokens: int | None = None) -> GenerationResult:
        """
        Decode up to ``max_new_tokens``, streaming through ``on_token``.

        With ``reply`` the tokens form an assistant reply (the template's reply header is
        added first unless one is open); without it the journal is simply continued. The
        session's last logits give the first token without recomputation; every emitted token
        is run through the model so the session ends at a clean boundary. ``speculative`` and
        ``num_draft_tokens`` default to ``generation.speculative`` / ``.num_draft_tokens``.
        """
        generation = self.config.generation
        speculative = SpeculativeMode(speculative or generation.speculative)
        if num_draft_tokens is None:
            num_draft_tokens = generation.num_draft_tokens
        if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgumentError(
                f'num_draft_tokens={num_draft_tokens} must be in [0, {MAX_DRAFT_TOKENS}]')
        if not 1 <= max_new_tokens <= self.max_seq_len:
            raise InvalidArgumentError(
                f'max_new_tokens={max_new_tokens} must be in [1, {self.max_seq_len}]')
        stop = [text for text in stop if text]
        with self._lock:
            session = self._session(session_id)
            hold = self._hold(session, resident=True)
        with hold:
            started = time.monotonic()
            if sampling is not None:
                if sampling.seed >= 0:
                    session.generator.manual_seed(sampling.seed)
                active = sampling
            else:
                active = session.sampling
            if not session.has_logits:
                raise InvalidArgumentError(
                    f'session {session_id!r} is empty; append a prompt before generating')
            header = self.tokenize(self.chat.reply_header(session.turn)) if reply else []
            if header:
                self._run(session, header)
                session.turn = TurnState.ASSISTANT_OPEN
            request = DecodeRequest(max_new_tokens, active, session.generator, tuple(stop),
                                    on_token, cancel)
            result = decode_loop(
                request, last_logits=lambda: session.slot.buffers['last_logits'],
                step=lambda token: self._run(session, [token]),
                room=lambda: self.max_seq_len - session.position, tokenizer=self.tokenizer,
                eos_token_ids=self.eos_token_ids, started=started,
                speculation=self._speculation(session, speculative, num_draft_tokens, active))
            session.drafted += result.drafted_tokens
            session.accepted += result.accepted_tokens
            with self._lock:
                self.speculation_totals['drafted'] += result.drafted_tokens
                self.speculation_totals['accepted'] += result.accepted_tokens
            if result.stop_reason is StopReason.EOS:
                session.turn = TurnState.ASSISTANT_ENDED
            self.last_latencies['generate'] = result.elapsed_s
            self.last_latencies['first_token'] = result.first_token_s
            return replace(result, header_tokens=len(header))

    # -- capsule verbs ----------------------------------------------------------------------

    def snapshot(self, session_id: str, label: str = '', pin: bool = False) -> CapsuleInfo:
        """Capture the session's complete state; copies no KV (cost independent of length)."""
        if label:
            check_plain_name(label, 'label')
        started = time.perf_counter()
        with self._lock:
            session = self._session(session_id)
            with self._hold(session):
                capsule_id = self.store.new_capsule_id(label)
                self.store.check_fits(self.layout.capsule_bytes(session.position),
                                      f'capsule of {session.position} tokens')
                self._resident(session)
                capsule = self._capture(session, capsule_id, label, session.parent_id)
                self.store.add(capsule, pin)
                session.parent_id = capsule_id
                latency = time.perf_counter() - started
                self.last_latencies['snapshot'] = latency
                self._emit(CapsuleEvent(EventKind.CREATED, capsule_id, session_id,
                                        f'{session.position} tokens', latency))
                return self.store.info(capsule)

    def _capture(self, session: Session, capsule_id: str, label: str,
                 parent_id: str) -> Capsule:
        """Record a resident session's complete state as a capsule; copies no KV."""
        if session.position > session.chain_end:
            session.chain = session.chain + (self.residency.add_segment(
                session.slot, session.chain_end, session.position),)
        return Capsule(
            capsule_id=capsule_id, label=label, session_id=session.session_id,
            parent_id=parent_id, position=session.position, fingerprint=self.fingerprint,
            created=time.time(), chain=session.chain, fixed=self._export_fixed(session),
            fixed_bytes=self.layout.fixed_bytes())

    def _export_fixed(self, session: Session) -> dict[str, torch.Tensor]:
        buffers = session.slot.buffers
        scalars = buffers['scalars']
        scalars[SCALAR_POSITION] = session.position
        scalars[SCALAR_TURN] = int(session.turn)
        scalars[SCALAR_HAS_LOGITS] = int(session.has_logits)
        scalars[SCALAR_TOP_K] = session.sampling.top_k
        scalars[SCALAR_SEED] = session.sampling.seed
        scalars[SCALAR_DRAFTED] = session.drafted
        scalars[SCALAR_ACCEPTED] = session.accepted
        buffers['sampler'][SAMPLER_TEMPERATURE] = session.sampling.temperature
        buffers['sampler'][SAMPLER_TOP_P] = session.sampling.top_p
        buffers['rng_state'].copy_(session.generator.get_state())
        fixed = self.residency.share_fixed(session.slot)  # conv, recurrent: by reference
        fixed.update({spec.name: buffers[spec.name].clone() for spec in self.layout.fixed_specs
                      if spec.name not in fixed})
        return fixed

    def _import_fixed(self, session: Session, fixed: dict[str, torch.Tensor]) -> None:
        self.residency.adopt_fixed(session.slot, fixed)
        buffers = session.slot.buffers
        for spec in self.layout.fixed_specs:
            if spec.name not in self.residency.shared_names:
                buffers[spec.name].copy_(fixed[spec.name])
        meta = SessionMeta.decode(buffers)
        session.position = meta.position
        session.turn = meta.turn
        session.has_logits = bool(meta.has_logits_flag)
        session.sampling = meta.sampling
        session.drafted, session.accepted = meta.drafted, meta.accepted
        session.generator.set_state(buffers['rng_state'].clone())

    def restore(self, capsule_id: str, session_id: str = '') -> RestoreResult:
        """
        Put a capsule's state into a session (its own by default, or a new one).

        Same slot and still resident: only the small fixed state is copied. Otherwise the
        missing segments are copied in at memory speed, after copy-on-write has saved whatever
        other capsules need of the positions being overwritten.
        """
        started = time.perf_counter()
        with self._lock:
            capsule = self.store.get(capsule_id)
            target = session_id or capsule.session_id
            if target not in self._sessions and not session_id:
                target = ''  # the capsule's session is gone: open a new one
            protect = frozenset([capsule_id])
            session = (self._session(target) if target
                       else self._new_session('', None, protect))
            try:
                with self._hold(session):
                    self._resident(session, keep_state=False, protect=protect)
                    copied = self._enter(session, capsule)
            except Exception:
                if not target:
                    self._discard_session(session)
                raise
            latency = time.perf_counter() - started
            self.last_latencies['restore'] = latency
            self._emit(CapsuleEvent(EventKind.RESTORED, capsule_id, session.session_id,
                                    f'copied {copied} bytes', latency))
            return RestoreResult(session.session_id, capsule.position, copied, latency)

    def _enter(self, session: Session, capsule: Capsule) -> int:
        """Make ``session`` continue from ``capsule``; returns the KV bytes copied."""
        copied = self.residency.load_chain(session.slot, capsule)
        self._import_fixed(session, capsule.fixed)
        session.chain = capsule.chain
        session.parent_id = capsule.capsule_id
        return copied

    def _discard_session(self, session: Session) -> None:
        """Forget a session (closed, or a failed restore's or branch's new one)."""
        if session.slot is not None:
            self.residency.release_slot(session.slot)
            self._free_slots.append(session.slot)
        if session.parked is not None:
            self.store.discard(session.parked.capsule_id)
        session.slot = session.parked = None
        self._sessions.pop(session.session_id, None)

    def branch(self, capsule_id: str, num_branches: int) -> list[str]:
        """Open ``num_branches`` new sessions, each continuing from the capsule."""
        started = time.perf_counter()
        if not 1 <= num_branches <= MAX_BRANCHES:
            raise InvalidArgumentError(f'num_branches={num_branches} must be in '
                                       f'[1, {MAX_BRANCHES}]')
        with self._lock:
            capsule = self.store.get(capsule_id)
            # children beyond the free slots swap idle sessions (earlier children too) out
            protect = frozenset([capsule_id])
            children = []
            try:
                for _ in range(num_branches):
                    session = self._new_session('', None, protect)
                    children.append(session)
                    with self._hold(session):
                        self._enter(session, capsule)
            except Exception:
                for session in children:
                    self._discard_session(session)
                raise
            children = [session.session_id for session in children]
            latency = time.perf_counter() - started
            self.last_latencies['branch'] = latency
            self._emit(CapsuleEvent(EventKind.BRANCHED, capsule_id, ','.join(children),
                                    f'{num_branches} branches', latency))
            return children

    def release(self, capsule_id: str) -> int:
        """Drop a capsule; returns the bytes freed."""
        with self._lock:
            return self.store.release(capsule_id)

    def list_capsules(self, session_id: str = '') -> list[CapsuleInfo]:
        """Describe live capsules (optionally of one session), oldest use first."""
        with self._lock:
            return [self.store.info(capsule) for capsule in self.store.capsules()
                    if not session_id or capsule.session_id == session_id]

    def save(self, capsule_id: str, name: str = '') -> SaveResult:
        """
        Write a capsule (whole prefix included) to the capsule directory.

        The name switches from its previous version to the new one in one atomic step; any
        write failure is ``CapsuleIOError`` and leaves the previous version in place.
        """
        started = time.perf_counter()
        name = name or capsule_id
        directory = self.config.capsules.directory()
        check_plain_name(name, 'capsule name')
        with self._lock:
            capsule = self.store.get(capsule_id)
            # copies taken under the lock: a slot may be overwritten once it is released
            segments = [({'uid': segment.uid, 'start': segment.start, 'end': segment.end},
                         {key: value.clone() for key, value in
                          segment.read(self.layout).items()})
                        for segment in capsule.chain]
            owner = self._sessions.get(capsule.session_id)
            incarnation = owner.incarnation if owner is not None else ''
        manifest = {'capsule_id': capsule.capsule_id, 'label': capsule.label,
                    'session_id': capsule.session_id, 'session_incarnation': incarnation,
                    'parent_id': capsule.parent_id, 'position': capsule.position,
                    'fingerprint': capsule.fingerprint, 'created': capsule.created,
                    'model': self.model_name,
                    'layout': persist.layout_description(self.layout)}
        persist.sweep(directory)
        path, written = persist.write_capsule(directory, name, manifest, capsule.fixed,
                                              segments)
        latency = time.perf_counter() - started
        self.last_latencies['save'] = latency
        self._emit(CapsuleEvent(EventKind.SAVED, capsule_id, capsule.session_id, str(path),
                                latency))
        return SaveResult(str(path), written, latency)

    def load(self, name: str) -> CapsuleInfo:
        """
        Load a saved capsule into memory under the id ``name`` (verified first).

        All or nothing: every check (file, session state, id, fingerprint, budget, shared
        segments) passes before anything is evicted or charged. The capsule belongs to a live
        session only if it was saved from that very session of this engine; otherwise its
        ``session_id`` is empty and a restore without a session id opens a new one.
        """
        started = time.perf_counter()
        directory = self.config.capsules.directory()
        saved = persist.read_capsule(directory, name, self.layout, self.fingerprint,
                                     self.max_seq_len, self.model_config.vocab_size)
        manifest = saved.manifest
        position = manifest['position']
        try:
            meta = SessionMeta.decode(saved.fixed)  # what a restore of it will read
            if meta.position != position:
                raise ValueError(f'its state says position {meta.position}, its manifest and '
                                 f'data {position}')
            if meta.has_logits_flag != int(position > 0):
                raise ValueError(f'has-logits flag {meta.has_logits_flag} at position '
                                 f'{position}')
            new_generator(0).set_state(saved.fixed['rng_state'])
        except (ValueError, RuntimeError) as error:
            raise CorruptCapsuleError(
                f'capsule {name!r}: inconsistent session state ({error})') from None
        # on the device before the lock: a failure here (device memory) changes nothing
        fixed = {key: value.to(self.device) for key, value in saved.fixed.items()}
        segments = [(segment_manifest, {key: value.to(self.device)
                                        for key, value in tensors.items()})
                    for segment_manifest, tensors in saved.segments]
        with self._lock:
            capsule_id = self.store.new_capsule_id(name)
            self.store.check_fits(self.layout.capsule_bytes(position), f'capsule {name!r}')
            chain = []
            fresh = []
            for segment_manifest, tensors in segments:
                uid, start, end = (segment_manifest['uid'], segment_manifest['start'],
                                   segment_manifest['end'])
                live = self.store.segment_by_uid(uid)
                if live is None:
                    segment = Segment(start, end, self.layout.sequence_bytes(end - start), uid)
                    fresh.append((segment, tensors))
                    chain.append(segment)
                    continue
                # shared with a capsule already in memory: the same uid is the same bytes
                stored = live.read(self.layout)
                if (live.start, live.end) != (start, end) or not all(
                        torch.equal(stored[key], value) for key, value in tensors.items()):
                    raise CorruptCapsuleError(
                        f'capsule {name!r}: segment {uid} is in memory with other contents '
                        f'(a forged file, or one pieced together from different saves)')
                chain.append(live)
            owner = self._sessions.get(manifest['session_id'])
            same_session = (owner is not None and manifest['session_incarnation']
                            == owner.incarnation)
            capsule = Capsule(
                capsule_id=capsule_id, label=manifest['label'],
                session_id=manifest['session_id'] if same_session else '',
                parent_id=manifest['parent_id'], position=position,
                fingerprint=manifest['fingerprint'], created=manifest['created'],
                chain=tuple(chain), fixed=fixed, fixed_bytes=self.layout.fixed_bytes())
            self.store.add_loaded(capsule, fresh)
            latency = time.perf_counter() - started
            self.last_latencies['load'] = latency
            self._emit(CapsuleEvent(EventKind.LOADED, capsule_id, capsule.session_id,
                                    str(directory / name), latency))
            return self.store.info(capsule)

    def saved_capsules(self) -> list[str]:
        """Names of capsules saved in the capsule directory that could load."""
        directory = self.config.capsules.directory()
        persist.sweep(directory)  # what interrupted saves (of any process) left behind
        return persist.list_saved(directory)

    def capsule(self, capsule_id: str) -> Capsule:
        """Return the live capsule record (for persistence and tests)."""
        with self._lock:
            return self.store.get(capsule_id, touch=False)


class _Release:
    """Context manager releasing an already acquired lock."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._lock.release()
        return False
