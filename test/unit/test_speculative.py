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
Speculative decoding (prompt lookup) on random-weight models of every family, fp32.

- Greedy output with speculation is the output of plain greedy decoding, whatever the
  acceptance rate (1 to 8 drafts per pass; prompts that repeat and prompts that do not; and
  scripted drafts that force full accepts, partial accepts and rejections on every family).
- The rejection rule leaves the output distribution equal to the target's (chi-square).
- Capsule verbs taken after a rejected draft, after a full accept and inside a verify window
  (a stop that cuts the accepted drafts) continue exactly; the property-based capsule programs
  run with speculation too.
"""

import functools

from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.speculative import accept_drafts, PromptLookupDrafter
from capsule_ros.runtime.testing import run_capsule_programs, write_tiny_model
from conftest import make_engine
import pytest
from speculation_tools import (check_every_way_back, FAMILIES, REPEATING, run, SAMPLING,
                               scripted_drafts)
import torch

PLAIN = 'Where should the robot put the cup after cleaning the kitchen?'


@pytest.fixture(scope='module', params=FAMILIES)
def engine(request, tmp_path_factory):
    family = request.param
    model_dir = write_tiny_model(tmp_path_factory.mktemp(f'tiny-{family}'), family=family)
    return make_engine(model_dir, tmp_path_factory.mktemp('capsules'))


class ScriptedDrafter(PromptLookupDrafter):
    """
    Drafts the plain greedy continuation with every fifth draft wrong (set ``reference``).

    Random-weight models seldom repeat their context, so prompt lookup alone would leave some
    families with few drafts; these give every family full accepts, partial accepts and
    rejections. Like lookup, the drafts are a function of the journal only.
    """

    reference: list[int] = []  # the prompt's tokens, then plain greedy decoding's

    def propose(self, num_tokens):
        start = len(self.tokens)
        if start < 2 or self.tokens[:start] != self.reference[:start]:
            return super().propose(num_tokens)
        return scripted_drafts(self.reference, start, num_tokens)


@pytest.fixture
def scripted(engine, monkeypatch):
    """Install ScriptedDrafter with the plain greedy continuation of REPEATING."""
    _, (journal, _) = run(engine, REPEATING, 96, speculative='off')
    monkeypatch.setattr(ScriptedDrafter, 'reference', journal)
    monkeypatch.setattr('capsule_ros.runtime.engine.PromptLookupDrafter', ScriptedDrafter)
    return journal


# -- the drafter ---------------------------------------------------------------------------


def test_lookup_drafts_follow_the_latest_longest_match():
    drafter = PromptLookupDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 7], min_ngram=1)
    drafter.extend([2, 3])  # "2 3" occurred twice: the latest one was followed by 5 6 7
    assert drafter.propose(2) == [5, 6]
    assert drafter.propose(8) == [5, 6, 7, 2, 3]  # up to the end of the context
    drafter.extend([4])  # "2 3 4" only at the start: the longest n-gram wins over "4"
    assert drafter.propose(3) == [9, 2, 3]
    drafter.extend([8])  # never seen: no drafts
    assert drafter.propose(3) == []
    assert drafter.propose(0) == []
    assert PromptLookupDrafter([5], min_ngram=1).propose(2) == []  # never matches itself
    # by default a single token is too weak a match: two are needed
    default = PromptLookupDrafter([1, 2, 3, 4, 9, 2, 3, 5])
    default.extend([7, 3])
    assert default.propose(2) == []
    default.extend([5])
    assert default.propose(2) == [7, 3]  # "3 5" occurred before, followed by 7 3


# -- greedy: the tokens of plain decoding ---------------------------------------------------


def check_greedy_equivalence(engine, prompt, num_draft_tokens):
    plain, (plain_journal, plain_logits) = run(engine, prompt, 48, speculative='off')
    fast, (fast_journal, fast_logits) = run(engine, prompt, 48, speculative='lookup',
                                            num_draft_tokens=num_draft_tokens)
    assert fast.token_ids == plain.token_ids
    assert fast_journal == plain_journal  # rejected drafts left nothing behind
    # the state after speculation is the same state up to the rounding of batched rows
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=1e-4)
    assert plain.drafted_tokens == 0
    assert fast.accepted_tokens <= fast.drafted_tokens
    return fast


@pytest.mark.parametrize('num_draft_tokens', [1, 4, 8])
@pytest.mark.parametrize('prompt', [REPEATING, PLAIN], ids=['repeating', 'plain'])
def test_greedy_lookup_emits_the_tokens_of_plain_greedy(engine, prompt, num_draft_tokens):
    check_greedy_equivalence(engine, prompt, num_draft_tokens)


@pytest.mark.parametrize('num_draft_tokens', [1, 3, 8])
def test_greedy_speculation_through_accepts_and_rejects(engine, scripted, num_draft_tokens):
    """Every family: full accepts, partial accepts and rejections, plain greedy's tokens."""
    fast = check_greedy_equivalence(engine, REPEATING, num_draft_tokens)
    assert fast.drafted_tokens > fast.accepted_tokens > 0


def test_speculation_never_exceeds_max_new_tokens_or_the_slot(engine):
    for steps in (1, 2, 3, 5):
        result, _ = run(engine, REPEATING, steps, speculative='lookup', num_draft_tokens=8)
        assert len(result.token_ids) == steps
    session = engine.create_session(system_prompt=False)
    engine.append(session, REPEATING, role='raw')
    room = engine.max_seq_len - engine.session_position(session)
    result = engine.generate(session, engine.max_seq_len, reply=False, speculative='lookup',
                             num_draft_tokens=8)
    assert result.stop_reason.value == 'context_full'
    assert len(result.token_ids) == room
    assert engine.session_position(session) == engine.max_seq_len
    engine.close_session(session)


def test_mtp_without_a_head_is_refused_with_advice(engine, tmp_path):
    with pytest.raises(InvalidArgumentError, match='parameter generation.speculative: mtp'):
        make_engine(engine.config.model.path, tmp_path, generation={'speculative': 'mtp'})
    session = engine.create_session(system_prompt=False)
    engine.append(session, PLAIN)
    with pytest.raises(Exception, match='generation.speculative: mtp') as raised:
        engine.generate(session, 4, speculative='mtp')
    assert raised.value.code == 'INVALID_ARGUMENT'
    assert engine.generate(session, 2).token_ids  # the session is untouched and usable
    engine.close_session(session)


# -- sampling: the rejection rule keeps the target distribution -----------------------------


@pytest.mark.parametrize('proposal', ['one-hot', 'distribution'])
def test_rejection_rule_samples_the_target_distribution(proposal):
    """First emitted token over 40000 rounds: chi-square against the target distribution."""
    torch.manual_seed(0)
    vocab = 6
    sampling = SamplingConfig(temperature=1.0)
    logits = torch.tensor([[1.5, 0.2, -0.3, 0.9, -1.0, 0.0], [0.0] * vocab])  # [2, V]
    target = torch.softmax(logits[0], dim=-1)
    draft_probabilities = torch.softmax(torch.tensor([[0.1, 0.5, 1.2, -0.4, 0.3, 0.0]]), -1)
    generator = torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab)
    rounds = 40000
    for _ in range(rounds):
        if proposal == 'one-hot':
            draft, probabilities = 2, None  # an unlikely draft: mostly rejected
        else:
            draft = int(torch.multinomial(draft_probabilities[0], 1, generator=generator))
            probabilities = draft_probabilities
        accepted, replacement = accept_drafts([draft], logits, sampling, generator, probabilities)
        counts[draft if accepted else replacement] += 1
    expected = target * rounds
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 20.5, (chi_square, counts / rounds, target)  # p = 0.001, 5 dof


def test_greedy_rejection_needs_no_replacement():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    greedy = SamplingConfig()
    assert accept_drafts([1, 0], logits, greedy, generator) == (2, None)
    assert accept_drafts([1, 2], logits, greedy, generator) == (1, None)
    assert accept_drafts([2, 0], logits, greedy, generator) == (0, None)


def test_sampled_speculation_reproduces_from_a_seed(engine, scripted):
    first, _ = run(engine, REPEATING, 32, SAMPLING, speculative='lookup')
    again, _ = run(engine, REPEATING, 32, SAMPLING, speculative='lookup')
    assert first.token_ids == again.token_ids
    assert first.drafted_tokens > 0


# -- capsules in the middle of speculation ---------------------------------------------------


def continue_from(engine, session, steps=9):
    """Tokens, journal and last logits after ``steps`` more speculative tokens."""
    result = engine.generate(session, steps, reply=False, speculative='lookup',
                             num_draft_tokens=4)
    return result.token_ids, engine.session_tokens(session), engine.session_logits(session)


def assert_same(got, expected):
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2])  # bitwise


@pytest.mark.parametrize('sampling', [None, SAMPLING], ids=['greedy', 'sampling'])
def test_capsule_verbs_between_speculative_generations_continue_exactly(
        engine, scripted, sampling):
    """
    Stop after lengths 1..12: runs end after rejected drafts, full accepts, inside windows.

    Sampling uses the session's own RNG (seeded once), which the capsule carries.
    """
    session = engine.create_session(sampling=sampling, system_prompt=False)
    engine.append(session, REPEATING, role='raw')
    seen_reject = seen_accept = False
    for index, steps in enumerate([1, 2, 3, 5, 8, 12, 7]):
        result = engine.generate(session, steps, reply=False, speculative='lookup',
                                 num_draft_tokens=4)
        seen_reject |= result.drafted_tokens > result.accepted_tokens
        seen_accept |= result.accepted_tokens > 0
        label = f'spec-{index}'
        engine.snapshot(session, label)
        expected = continue_from(engine, session)
        engine.restore(label)
        check_every_way_back(engine, session, label,
                             lambda target: assert_same(continue_from(engine, target),
                                                        expected))
    assert seen_reject
    # random Qwen3.5 weights give nearly flat logits: sampling leaves the scripted (greedy)
    # path at once, so only greedy is sure to accept there
    if sampling is None or engine.model.family != 'qwen3_5':
        assert seen_accept
    engine.close_session(session)


def test_a_stop_inside_the_accepted_drafts_leaves_a_clean_boundary(engine, scripted):
    """EOS in the middle of a verify window: the session ends right after it, exactly."""
    plain, _ = run(engine, REPEATING, 24, speculative='off')
    fast, _ = run(engine, REPEATING, 24, speculative='lookup', num_draft_tokens=8)
    assert fast.token_ids == plain.token_ids
    eos_at = 9
    eos_token_ids = engine.eos_token_ids
    engine.eos_token_ids = frozenset([plain.token_ids[eos_at]])
    try:
        first = plain.token_ids.index(plain.token_ids[eos_at])
        stopped, (journal, logits) = run(engine, REPEATING, 24, speculative='lookup',
                                         num_draft_tokens=8)
        reference, (reference_journal, reference_logits) = run(engine, REPEATING, 24,
                                                               speculative='off')
    finally:
        engine.eos_token_ids = eos_token_ids
    assert stopped.stop_reason.value == 'eos'
    assert stopped.token_ids == plain.token_ids[:first + 1] == reference.token_ids
    assert journal == reference_journal
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-4)


def test_capsule_programs_with_speculation(engine, monkeypatch):
    """Random programs against a replay, budget checked after every step, drafts verified."""
    # the programs' ten words repeat, so single-token matches draft often (accepts and rejects)
    monkeypatch.setattr('capsule_ros.runtime.engine.PromptLookupDrafter',
                        functools.partial(PromptLookupDrafter, min_ngram=1))
    run_capsule_programs(engine, max_examples=15, steps=20, speculative='lookup')
