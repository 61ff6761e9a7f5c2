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
"""The decode loop: token selection, speculation, incremental detokenization, stop strings."""

from dataclasses import dataclass
import enum
import threading
import time
from typing import Callable

from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.sampling import select_token
from capsule_ros.runtime.speculative import accept_drafts, Speculation
import torch


class StopReason(str, enum.Enum):
    """Why a generation ended."""

    EOS = 'eos'
    STOP_STRING = 'stop_string'
    MAX_TOKENS = 'max_tokens'
    CANCELED = 'canceled'
    CONTEXT_FULL = 'context_full'


@dataclass(frozen=True)
class GenerationResult:
    """Outcome of ``generate``."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: StopReason
    first_token_s: float
    elapsed_s: float
    header_tokens: int = 0  # the reply header prefilled before the first token (template)
    drafted_tokens: int = 0  # drafts verified (speculative decoding)
    accepted_tokens: int = 0  # drafts accepted (each saved one forward pass)

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token."""
        decode_s = self.elapsed_s - self.first_token_s
        count = len(self.token_ids) - 1
        return count / decode_s if count > 0 and decode_s > 0 else 0.0


@dataclass
class DecodeRequest:
    """One generation over a session whose last logits are ready."""

    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator
    stop: tuple[str, ...] = ()
    on_token: Callable[[int, str], None] | None = None
    cancel: threading.Event | None = None


class IncrementalDetokenizer:
    """
    Text of a growing token list, decoding a short window per token instead of everything.

    Decodes ``tokens[prefix:]`` and ``tokens[prefix:read]`` and emits what the new token added
    (the technique of text-generation-inference and vLLM): the window starts a few tokens back
    so merges across the boundary are seen, and a trailing U+FFFD (an incomplete UTF-8
    sequence) waits for the next token. O(window) per token instead of O(length).
    """

    def __init__(self, tokenizer):
        """Start empty."""
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ''
        self._prefix = 0
        self._read = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append ``token``; return the text it completes (possibly empty)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith('\ufffd'):
            return ''
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Return whatever the last tokens hold back (an incomplete character), and add it."""
        before = self._decode(self.tokens[self._prefix:self._read])
        delta = self._decode(self.tokens[self._prefix:])[len(before):]
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        return delta


class _Emitter:
    """Hands tokens to the client one by one and decides whether the generation stops."""

    def __init__(self, request: DecodeRequest, tokenizer, eos_token_ids: frozenset[int],
                 started: float):
        self.request = request
        self.eos_token_ids = eos_token_ids
        self.started = started
        self.generated: list[int] = []
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.longest_stop = max((len(text) for text in request.stop), default=0)
        self.first_token_s = 0.0
        self.reason: StopReason | None = None
        self.stop_at: int | None = None  # where a stop string cuts the text

    def canceled(self) -> bool:
        if self.request.cancel is not None and self.request.cancel.is_set():
            self.reason = StopReason.CANCELED
            return True
        return False

    def selected(self) -> None:
        """Note the time the first token is known (TTFT: before it is run or verified)."""
        if not self.generated:
            self.first_token_s = time.monotonic() - self.started

    def emit(self, token: int) -> bool:
        """Stream ``token``; return whether the generation ends with it."""
        self.generated.append(token)
        if token in self.eos_token_ids:  # streamed too: it is in the journal, as in token_ids
            if self.request.on_token:
                self.request.on_token(token, '')
            self.reason = StopReason.EOS
            return True
        delta = self.detokenizer.add(token)
        if self.request.on_token:
            self.request.on_token(token, delta)
        # a stop string can only end in the new text: search the tail it may start in
        text = self.detokenizer.text
        tail_start = max(0, len(text) - len(delta) - self.longest_stop + 1)
        hits = [found for found in (text.find(stop, tail_start) for stop in self.request.stop)
                if found >= 0]
        if hits:
            self.reason = StopReason.STOP_STRING
            self.stop_at = min(hits)
            return True
        return False

    def result(self, drafted: int, accepted: int) -> GenerationResult:
        if self.stop_at is not None:
            text = self.detokenizer.text[:self.stop_at]
        else:
            self.detokenizer.flush()
            text = self.detokenizer.text
        return GenerationResult(text, tuple(self.generated), self.reason or StopReason.MAX_TOKENS,
                                self.first_token_s, time.monotonic() - self.started,
                                drafted_tokens=drafted, accepted_tokens=accepted)


def decode_loop(request: DecodeRequest, last_logits: Callable[[], torch.Tensor],
                step: Callable[[int], None], room: Callable[[], int], tokenizer,
                eos_token_ids: frozenset[int], started: float,
                speculation: Speculation | None = None) -> GenerationResult:
    """
    Select a token from ``last_logits()``, run it with ``step(token)``, repeat until a stop.

    ``room()`` is how many more tokens the session can hold. Every emitted token is run
    through the model, so the session ends at a clean boundary whatever the stop reason.

    With ``speculation`` each round runs the selected token and the drafts after it in one
    verify pass, emits the accepted prefix and keeps exactly the emitted tokens in the session
    (a stop inside the accepted prefix rolls back the rest, too). Drafts never exceed what
    ``max_new_tokens`` and ``room()`` still allow.
    """
    emitter = _Emitter(request, tokenizer, eos_token_ids, started)
    generated = emitter.generated
    drafted = accepted_total = 0
    replacement = None  # sampling: a token drawn after a rejected draft, not run yet
    while len(generated) < request.max_new_tokens:
        if emitter.canceled():
            break
        if room() <= 0:
            emitter.reason = StopReason.CONTEXT_FULL
            break
        if replacement is not None:
            token, replacement = replacement, None
        else:
            token = select_token(last_logits().float(), request.sampling, request.generator)
        emitter.selected()
        drafts: list[int] = []
        if speculation is not None:
            budget = min(speculation.num_draft_tokens,
                         request.max_new_tokens - len(generated) - 1, room() - 1)
            speculation.drafter.extend([token])
            drafts = speculation.drafter.propose(budget)
        if not drafts:
            step(token)
            if emitter.emit(token):
                break
            continue
        rows = speculation.verify([token] + drafts)  # [1 + k, V]
        accepted, replacement = accept_drafts(drafts, rows, request.sampling,
                                              request.generator,
                                              speculation.drafter.probabilities)
        drafted += len(drafts)
        accepted_total += accepted
        run = [token] + drafts[:accepted]
        emitted = 0
        for emitted, candidate in enumerate(run, start=1):
            if emitted > 1 and emitter.canceled():
                emitted -= 1
                break
            if emitter.emit(candidate):
                break
        if emitted < 1 + len(drafts):
            speculation.keep(emitted)
        speculation.drafter.extend(run[1:emitted])
        if emitter.reason is not None:
            break  # a stop (a pending replacement is never emitted)
    return emitter.result(drafted, accepted_total)
