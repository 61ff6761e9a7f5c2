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
Speculative decoding with an MTP head (random heads on random-weight models of every family).

- The head's state (its KV cache and the main model's last hidden state) is in the StateLayout
  and the fingerprint, and after any mix of accepted and rejected drafts it equals what one
  pass over the session's journal computes: rejected drafts leave nothing behind.
- Greedy output equals plain greedy decoding's, with the head's own drafts (random: nearly
  all rejected) and with scripted drafts that force full accepts, partial accepts and
  rejections through the same MTP state.
- Capsule verbs taken after a rejected draft, after a full accept and inside a verify window
  continue exactly, counters included; so do the property-based capsule programs.
"""

from capsule_ros.runtime.errors import CapsuleRosError
from capsule_ros.runtime.models.mtp import MTP_HIDDEN, MTP_KV
from capsule_ros.runtime.speculative import MtpDrafter
from capsule_ros.runtime.state import StateKind
from capsule_ros.runtime.testing import (run_capsule_programs, write_random_mtp_head,
                                         write_tiny_model)
from conftest import make_engine
import pytest
from speculation_tools import (check_every_way_back, FAMILIES, REPEATING, run, SAMPLING,
                               scripted_drafts)
import torch

MTP = {'speculative': 'mtp'}


@pytest.fixture(scope='module', params=FAMILIES)
def model_dir(request, tmp_path_factory):
    directory = write_tiny_model(tmp_path_factory.mktemp(f'tiny-{request.param}'),
                                 family=request.param)
    return write_random_mtp_head(directory, seed=1)


@pytest.fixture(scope='module')
def engine(model_dir, tmp_path_factory):
    return make_engine(model_dir, tmp_path_factory.mktemp('capsules'), generation=MTP)


class ScriptedMtpDrafter(MtpDrafter):
    """
    Runs the MTP head as usual, then drafts plain greedy's tokens with every fifth one wrong.

    The head's steps (and their KV writes beyond the position) happen exactly as with its own
    drafts; only the proposed tokens are replaced, so full and partial accepts occur on random
    weights too. Greedy only (the rejection rule would need the scripted tokens' q).
    """

    reference: list[int] = []  # the prompt's tokens, then plain greedy decoding's

    def propose(self, num_tokens):
        drafts = super().propose(num_tokens)
        position = self.position()
        context = self.state()['tokens'][:position].tolist() + [self.last_token]
        if context != self.reference[:position + 1]:
            return drafts
        return scripted_drafts(self.reference, position + 1, len(drafts))


@pytest.fixture
def scripted(engine, monkeypatch):
    _, (journal, _) = run(engine, REPEATING, 96, speculative='off')
    monkeypatch.setattr(ScriptedMtpDrafter, 'reference', journal)
    monkeypatch.setattr('capsule_ros.runtime.engine.MtpDrafter', ScriptedMtpDrafter)
    return journal


def mtp_state(engine, session):
    """Return the session's MTP KV at positions [1, position) and its last hidden state."""
    label = f'probe-{session}-{engine.session_position(session)}'
    engine.snapshot(session, label)
    capsule = engine.capsule(label)
    kv = torch.cat([segment.read(engine.layout)[MTP_KV] for segment in capsule.chain], dim=3)
    hidden = capsule.fixed[MTP_HIDDEN].clone()
    engine.release(label)
    return kv[:, :, :, 1:].clone(), hidden


def fresh_mtp_state(engine, tokens):
    """Compute the MTP state of one pass over ``tokens`` in a fresh slot."""
    state = engine.layout.allocate(engine.device)
    ids = torch.tensor(tokens)
    _, hidden = engine.model.forward(ids, 0, state, all_logits=True, return_hidden=True)
    engine.mtp.forward(ids[1:], hidden[:-1], 1, state[MTP_KV])
    return state[MTP_KV][:, :, :, 1:len(tokens)], hidden[-1]


# -- the state --------------------------------------------------------------------------------


def test_mtp_state_is_in_the_layout_and_the_fingerprint(engine, model_dir):
    kinds = {spec.name: spec for spec in engine.layout.specs}
    assert kinds[MTP_KV].kind is StateKind.MTP and kinds[MTP_KV].seq_axis == 3
    assert kinds[MTP_HIDDEN].kind is StateKind.MTP and kinds[MTP_HIDDEN].seq_axis is None
    # same checkpoint and capsule directory, no MTP drafting: no MTP state
    plain = make_engine(model_dir, engine.config.capsules.directory().parent)
    assert MTP_KV not in plain.layout.by_name and plain.mtp is None
    assert plain.fingerprint != engine.fingerprint
    session = engine.create_session(system_prompt=False)
    engine.append(session, REPEATING, role='raw')
    engine.snapshot(session, 'with-mtp')
    engine.save('with-mtp', 'with-mtp')
    engine.close_session(session)
    info = engine.list_capsules()[0]
    assert info.mtp_bytes > 0
    with pytest.raises(CapsuleRosError, match='fingerprint') as raised:
        plain.load('with-mtp')
    assert raised.value.code == 'FINGERPRINT_MISMATCH'
    # asking a plain engine for MTP drafts says how to get them
    session = plain.create_session(system_prompt=False)
    plain.append(session, REPEATING, role='raw')
    with pytest.raises(CapsuleRosError, match='set parameter generation.speculative: mtp'):
        plain.generate(session, 4, speculative='mtp')
    engine.release('with-mtp')


@pytest.mark.parametrize('num_draft_tokens', [1, 3, 8])
def test_mtp_state_after_speculation_is_one_pass_over_the_journal(engine, scripted,
                                                                  num_draft_tokens):
    """Accepts, rejections and their rollbacks leave the state a clean pass computes."""
    session = engine.create_session(system_prompt=False)
    engine.append(session, REPEATING, role='raw')
    result = engine.generate(session, 40, reply=False, speculative='mtp',
                             num_draft_tokens=num_draft_tokens)
    assert result.drafted_tokens > result.accepted_tokens > 0
    kv, hidden = mtp_state(engine, session)
    expected_kv, expected_hidden = fresh_mtp_state(engine, engine.session_tokens(session))
    torch.testing.assert_close(kv, expected_kv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
    engine.close_session(session)


# -- greedy: the tokens of plain decoding ---------------------------------------------------


@pytest.mark.parametrize('num_draft_tokens', [1, 3, 8])
def test_greedy_mtp_emits_the_tokens_of_plain_greedy(engine, num_draft_tokens):
    """The random head's own drafts: almost all rejected, the output unchanged."""
    plain, (plain_journal, plain_logits) = run(engine, REPEATING, 48, speculative='off')
    fast, (fast_journal, fast_logits) = run(engine, REPEATING, 48, speculative='mtp',
                                            num_draft_tokens=num_draft_tokens)
    assert fast.token_ids == plain.token_ids
    assert fast_journal == plain_journal
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=1e-4)
    assert fast.drafted_tokens >= 48 // (num_draft_tokens + 1)


@pytest.mark.parametrize('num_draft_tokens', [1, 3, 8])
def test_greedy_mtp_through_accepts_and_rejects(engine, scripted, num_draft_tokens):
    plain, (plain_journal, _) = run(engine, REPEATING, 48, speculative='off')
    fast, (fast_journal, _) = run(engine, REPEATING, 48, speculative='mtp',
                                  num_draft_tokens=num_draft_tokens)
    assert fast.token_ids == plain.token_ids
    assert fast_journal == plain_journal
    assert fast.drafted_tokens > fast.accepted_tokens > 0


def test_sampled_mtp_speculation_reproduces_from_a_seed(engine):
    first, _ = run(engine, REPEATING, 24, SAMPLING, speculative='mtp')
    again, _ = run(engine, REPEATING, 24, SAMPLING, speculative='mtp')
    assert first.token_ids == again.token_ids
    assert first.drafted_tokens > 0


# -- capsules in the middle of speculation ---------------------------------------------------


def continue_from(engine, session, steps=9):
    """Tokens, journal, last logits, MTP state and counters after ``steps`` more tokens."""
    result = engine.generate(session, steps, reply=False, speculative='mtp',
                             num_draft_tokens=4)
    kv, hidden = mtp_state(engine, session)
    return (result.token_ids, engine.session_tokens(session),
            engine.session_speculation(session), engine.session_logits(session), kv, hidden)


def assert_same(got, expected):
    assert got[:3] == expected[:3]
    for got_tensor, expected_tensor in zip(got[3:], expected[3:]):
        assert torch.equal(got_tensor, expected_tensor)  # bitwise


@pytest.mark.parametrize('sampling', [None, SAMPLING], ids=['greedy', 'sampling'])
def test_capsule_verbs_in_mtp_speculation_continue_exactly(engine, scripted, sampling):
    """Stop after lengths 1..12: after rejected drafts, full accepts, inside windows."""
    session = engine.create_session(sampling=sampling, system_prompt=False)
    engine.append(session, REPEATING, role='raw')
    seen_reject = seen_accept = False
    for index, steps in enumerate([1, 2, 3, 5, 8, 12, 7]):
        result = engine.generate(session, steps, reply=False, speculative='mtp',
                                 num_draft_tokens=4)
        seen_reject |= result.drafted_tokens > result.accepted_tokens
        seen_accept |= result.accepted_tokens > 0
        label = f'mtp-{index}'
        engine.snapshot(session, label)
        counters = engine.session_speculation(session)
        expected = continue_from(engine, session)
        assert engine.session_speculation(session) != counters
        engine.restore(label)
        assert engine.session_speculation(session) == counters  # the capsule carries them
        check_every_way_back(engine, session, label,
                             lambda target: assert_same(continue_from(engine, target),
                                                        expected))
    assert seen_reject
    if sampling is None:
        assert seen_accept
    engine.close_session(session)


def test_capsule_programs_with_mtp_speculation(engine):
    """Random programs against a replay, budget checked after every step, MTP drafts verified."""
    run_capsule_programs(engine, max_examples=10, steps=20, speculative='mtp')
