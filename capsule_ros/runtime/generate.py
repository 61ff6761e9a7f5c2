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
"""The decode loop: token selection, incremental detokenization, stop strings, stop reasons."""

from dataclasses import dataclass
import enum
import threading
import time
from typing import Callable

from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.sampling import select_token
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


def decode_loop(request: DecodeRequest, last_logits: Callable[[], torch.Tensor],
                step: Callable[[int], None], room: Callable[[], int], tokenizer,
                eos_token_ids: frozenset[int], started: float) -> GenerationResult:
    """
    Select a token from ``last_logits()``, run it with ``step(token)``, repeat until a stop.

    ``room()`` is how many more tokens the session can hold. Every emitted token is run
    through the model, so the session ends at a clean boundary whatever the stop reason.
    """
    generated: list[int] = []
    detokenizer = IncrementalDetokenizer(tokenizer)
    longest_stop = max((len(text) for text in request.stop), default=0)
    first_token_s = 0.0
    reason = StopReason.MAX_TOKENS
    while len(generated) < request.max_new_tokens:
        if request.cancel is not None and request.cancel.is_set():
            reason = StopReason.CANCELED
            break
        if room() <= 0:
            reason = StopReason.CONTEXT_FULL
            break
        token = select_token(last_logits().float(), request.sampling, request.generator)
        if not generated:
            first_token_s = time.monotonic() - started
        generated.append(token)
        step(token)
        if token in eos_token_ids:  # streamed too: it is in the journal, as in token_ids
            if request.on_token:
                request.on_token(token, '')
            reason = StopReason.EOS
            break
        delta = detokenizer.add(token)
        if request.on_token:
            request.on_token(token, delta)
        # a stop string can only end in the new text: search the tail it may start in
        tail_start = max(0, len(detokenizer.text) - len(delta) - longest_stop + 1)
        hits = [found for found in (detokenizer.text.find(stop, tail_start)
                                    for stop in request.stop) if found >= 0]
        if hits:
            reason = StopReason.STOP_STRING
            return GenerationResult(detokenizer.text[:min(hits)], tuple(generated), reason,
                                    first_token_s, time.monotonic() - started)
    detokenizer.flush()
    return GenerationResult(detokenizer.text, tuple(generated), reason, first_token_s,
                            time.monotonic() - started)
