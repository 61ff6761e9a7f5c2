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
Speculative decoding: drafters propose tokens, one forward pass of the model verifies them.

Two drafters share one interface (``extend`` the context, ``propose`` up to k tokens,
``probabilities``: the drafts' distributions or None for one-hot): prompt lookup, which needs
no weights, and the model's multi-token-prediction head (``capsule_ros.runtime.models.mtp``).

A round of the decode loop picks the next token ``t0`` as plain decoding would, asks the
drafter for up to k tokens that may follow it, and runs ``[t0, d1 .. dk]`` in one forward pass.
Row ``i`` of its logits is what plain decoding would have seen after ``d_i`` (``t0`` for row
0), so it judges draft ``d_(i+1)``:

- greedy: a draft is accepted while it equals the argmax of the row before it, so the tokens
  are those of plain greedy decoding whatever the acceptance rate;
- sampling: the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): accept
  ``d`` with probability ``min(1, p(d) / q(d))``, else draw the replacement from
  ``max(p - q, 0)`` normalized. ``p`` is the session's sampling distribution (temperature,
  top-k, top-p) of the row, ``q`` the drafter's (one-hot for prompt lookup). The output
  distribution is exactly ``p``'s; every draw uses the session's RNG, so capsules reproduce
  samples.

The engine then keeps the accepted prefix and rolls the rest back (``SlotVerifier``).
"""

from dataclasses import dataclass
from typing import Callable

from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.models.mtp import MTP_HIDDEN
from capsule_ros.runtime.sampling import sample_from, token_distribution
import torch


class PromptLookupDrafter:
    """
    Drafts by prompt lookup: the tokens that followed the last occurrence of the current n-gram.

    Planners repeat entity names, locations and tool calls from their context, so the continuation
    of an earlier occurrence of the last 2-3 tokens is often what comes next. The longest n-gram
    with an earlier occurrence wins, and of its occurrences the most recent. A single token is
    too weak a match by default: on SmolLM2 it drafted 60 tokens for 5 accepted on a chat answer
    (a 5-20% slowdown), two tokens 9 for 3, at the same acceptance on a planner. Indexes are
    updated per token (O(1)), never rebuilt.
    """

    probabilities = None  # one-hot drafts (the rejection rule's q)

    def __init__(self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 2):
        """Index the session's tokens so far."""
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: list[int] = []
        # n -> {n-gram: index of the token that followed its latest occurrence}
        self._follows: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(min_ngram, max_ngram + 1)}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens to the context."""
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before ``token`` now have a follower
            for n, follows in self._follows.items():
                if end >= n:
                    follows[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(int(token))

    def propose(self, num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` drafts that follow the context (none if nothing matches)."""
        if num_tokens <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            follower = self._follows[n].get(tuple(self.tokens[-n:]))
            if follower is not None:
                return self.tokens[follower:follower + num_tokens]
        return []


class MtpDrafter:
    """
    Drafts with the model's MTP head, chained: each draft and the head's output feed the next.

    The first step pairs the selected token (at the session's position) with the main model's
    last hidden state; step i runs at position + i and writes the head's KV there, beyond the
    session's position, where the verify pass's MTP advance overwrites it before anything
    reads it. Greedy sessions draft the argmax; sampling sessions draw from the head's
    distribution (the session's temperature, top-k, top-p) with the session's RNG and hand
    the distributions to the rejection rule (``probabilities`` [k, V]).
    """

    def __init__(self, head, state: Callable[[], dict[str, torch.Tensor]],
                 position: Callable[[], int], prepare_write: Callable[[], None],
                 sampling: SamplingConfig, generator: torch.Generator):
        """Draft from the slot buffers ``state()`` at ``position()``."""
        self.head = head
        self.state = state
        self.position = position
        self.prepare_write = prepare_write  # copy-on-write before writing beyond the position
        self.sampling = sampling
        self.generator = generator
        self.probabilities: torch.Tensor | None = None
        self.last_token: int | None = None

    def extend(self, tokens: list[int]) -> None:
        """Note the tokens that follow the context (the last one is the next to draft after)."""
        if tokens:
            self.last_token = int(tokens[-1])

    def propose(self, num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` drafts that follow the last token (a chain of head steps)."""
        self.probabilities = None
        if num_tokens <= 0 or self.last_token is None:
            return []
        self.prepare_write()
        state = self.state()
        position = self.position()
        kv = state['mtp_kv']
        hidden = state['mtp_hidden'][None]  # [1, D]
        token = self.last_token
        drafts, distributions = [], []
        for offset in range(num_tokens):
            ids = torch.tensor([token], dtype=torch.int64, device=kv.device)
            hidden = self.head.forward(ids, hidden, position + offset, kv)  # [1, D]
            logits = self.head.logits(hidden)[0]  # [V] fp32
            if self.sampling.is_greedy:
                token = int(torch.argmax(logits))
            else:
                distribution = token_distribution(logits, self.sampling)  # [V]
                token = sample_from(distribution, self.generator)
                distributions.append(distribution)
            drafts.append(token)
        if distributions:
            self.probabilities = torch.stack(distributions)  # [k, V]
        return drafts


class SlotVerifier:
    """
    Verify passes over one session's slot, and the rollback of the drafts they rejected.

    KV, the MTP head's KV and the token journal are append-only, so moving the position back
    undoes them, and the verify pass's rows of the last kept token become the last logits (and
    the MTP head's last hidden state). Conv and recurrent state are overwritten by every token
    and cannot be un-applied: the verify pass writes them copy-on-write (the state before it is
    kept by reference, no copy), and a partial accept puts that state back and runs the kept
    tokens again, which costs one more forward pass of at most k tokens only when a draft was
    rejected. Keeping per-position states instead would cost a copy of every recurrent state
    per verified token on every pass, accepted or not.
    """

    def __init__(self, session, residency, lock, forward: Callable):
        """
        Verify in ``session`` (held by the caller) through the engine's ``forward``.

        ``forward(session, ids, all_logits)`` runs ids at the session's position and advances
        it, returning the logits and (with an MTP head) the hidden states; ``residency`` is the
        engine's SlotResidency, used under ``lock``.
        """
        self.session = session
        self.residency = residency
        self.lock = lock
        self.forward = forward
        self.device = session.slot.buffers['tokens'].device
        # conv / recurrent state: put back and re-run; MTP's last hidden alone: a verify row
        self.rerun = any(name != MTP_HIDDEN for name in residency.overwritten_names)
        self._last: dict = {}  # the latest pass: its start, tokens, rows, hidden, state before

    def prepare_write(self) -> None:
        """Copy-on-write of what capsules need of the slot from the session's position on."""
        with self.lock:
            self.residency.prepare_write(self.session.slot, self.session.position)

    def verify(self, token_ids: list[int]) -> torch.Tensor:
        """Run tokens at the session's position in one pass; return fp32 logits [T, V]."""
        session = self.session
        self.prepare_write()
        before = self.residency.share_fixed(session.slot) if self.rerun else None
        self._last.update(start=session.position, tokens=token_ids, before=before)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        self._last['rows'], self._last['hidden'] = self.forward(session, ids, all_logits=True)
        return self._last['rows']

    def keep(self, count: int) -> None:
        """Keep the first ``count`` verified tokens, as if only they had been run."""
        session, last = self.session, self._last
        buffers = session.slot.buffers
        if not self.rerun:
            session.position = last['start'] + count
            buffers['last_logits'].copy_(last['rows'][count - 1])
            if last['hidden'] is not None:
                buffers[MTP_HIDDEN].copy_(last['hidden'][count - 1])
            return
        self.residency.adopt_fixed(session.slot, last['before'])
        session.position = last['start']
        ids = torch.tensor(last['tokens'][:count], dtype=torch.int64, device=self.device)
        self.forward(session, ids)


@dataclass
class Speculation:
    """What the decode loop needs to speculate: a drafter and the engine's verify and keep."""

    drafter: PromptLookupDrafter | MtpDrafter
    num_draft_tokens: int
    # run tokens at the session's position in one forward pass; returns fp32 logits [T, V]
    verify: Callable[[list[int]], torch.Tensor]
    # after verify: keep the first n of the verified tokens, as if only they had been run
    keep: Callable[[int], None]


def accept_drafts(drafts: list[int], rows: torch.Tensor, sampling: SamplingConfig,
                  generator: torch.Generator,
                  draft_probabilities: torch.Tensor | None = None) -> tuple[int, int | None]:
    """
    Judge ``drafts`` against verify logits ``rows`` [len(drafts) + 1, V] (row i judges draft i).

    Returns the number accepted and, when sampling rejected a draft, the replacement token drawn
    from the residual distribution (greedy needs none: the next token is the argmax of the
    row after the accepted prefix, which plain decoding takes from the last logits anyway).
    ``draft_probabilities`` [k, V]: the drafter's distributions; None means one-hot drafts.
    """
    for index, draft in enumerate(drafts):
        row = rows[index].float()
        if sampling.is_greedy:
            if int(torch.argmax(row)) != draft:
                return index, None
            continue
        target = token_distribution(row, sampling)  # [V]
        if draft_probabilities is None:
            accept_probability = target[draft]
            residual = target.clone()
            residual[draft] = 0.0
        else:
            proposal = draft_probabilities[index]
            accept_probability = torch.clamp(target[draft] / proposal[draft], max=1.0)
            residual = torch.clamp(target - proposal, min=0.0)
        if torch.rand(1, generator=generator) < accept_probability:
            continue
        if float(residual.sum()) <= 0.0:  # p == q: nothing left to draw from; take p
            residual = target
        return index, sample_from(residual, generator)
    return len(drafts), None
