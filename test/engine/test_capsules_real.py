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
Capsule equivalences (a)-(e) on the real SmolLM2 weights, bitwise on CPU.

Each runs in fp32, in the node's default (bf16 with 4-bit decode weights) and on the
onnxruntime backend (the exported graph, fp32).
"""

import math

from capsule_ros.runtime.config import SamplingConfig
from conftest import BRIEFING, CAPSULE_ENGINES, make_capsule_engine
import pytest
import torch


OBSERVATIONS = ['Aisle 7 is blocked by a pallet.', 'A person is standing at station B.',
                'The bolts box on level 2 is empty.']


def continue_greedy(engine, session, steps=12):
    """Greedy continuation and the logits after it."""
    tokens = engine.generate(session, steps).token_ids
    return tokens, engine.session_logits(session)


def assert_greedy_under_teacher_forcing(engine, session, tokens):
    """
    Each token is a greedy choice of ``session`` fed the tokens before it, up to a bf16 tie.

    bf16 logits near 20 are spaced 0.125 apart, so equal maxima are common and a cold prefill
    (other chunk boundaries, so other roundings) may break a tie the other way: each token
    must hold the maximum logit to within two bf16 steps of it (a wrong weight or a wrong
    position moves logits by whole units).
    """
    for index, token in enumerate(tokens):
        logits = engine.session_logits(session).float()
        best = float(logits.max())
        bf16_step = 2.0 ** (math.floor(math.log2(abs(best))) - 7)
        assert best - float(logits[token]) <= 2 * bf16_step, (
            index, token, int(logits.argmax()))
        engine.append(session, tokens=[token])


def test_a_snapshot_generate_restore_generate_is_identical(capsule_engine):
    engine = capsule_engine
    session = engine.create_session()
    engine.append(session, BRIEFING)
    engine.snapshot(session, 'real-a')
    first = continue_greedy(engine, session)
    assert engine.restore('real-a').copied_bytes == 0  # rollback in place
    second = continue_greedy(engine, session)
    assert first[0] == second[0] and torch.equal(first[1], second[1])
    engine.close_session(session)
    engine.release('real-a')


def test_b_restore_into_another_session_is_identical(capsule_engine):
    engine = capsule_engine
    session = engine.create_session()
    engine.append(session, BRIEFING)
    engine.snapshot(session, 'real-b')
    expected = continue_greedy(engine, session)
    other = engine.create_session()
    engine.append(other, 'Something else entirely.')
    assert engine.restore('real-b', other).copied_bytes > 0
    got = continue_greedy(engine, other)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    for name in (session, other):
        engine.close_session(name)
    engine.release('real-b')


def test_c_branches_equal_independent_runs_and_cold_prefill(capsule_engine):
    engine = capsule_engine
    parent = engine.create_session()
    engine.append(parent, BRIEFING)
    engine.snapshot(parent, 'real-c')
    children = engine.branch('real-c', 3)
    for child, observation in zip(children, OBSERVATIONS):
        engine.append(child, observation, role='observation')
        got = continue_greedy(engine, child)
        scratch = engine.create_session()  # same operations from scratch
        engine.append(scratch, BRIEFING)
        engine.append(scratch, observation, role='observation')
        independent = continue_greedy(engine, scratch)
        engine.close_session(scratch)
        assert got[0] == independent[0] and torch.equal(got[1], independent[1])
        journal = engine.session_tokens(child)
        cold = engine.create_session()  # one-shot cold prefill of the full text
        engine.append(cold, tokens=journal[:len(journal) - len(got[0])])
        if engine.dtype == torch.float32:
            assert engine.generate(cold, len(got[0]), reply=False).token_ids == got[0]
        else:
            assert_greedy_under_teacher_forcing(engine, cold, got[0])
        for name in (cold, child):
            engine.close_session(name)
    engine.close_session(parent)
    engine.release('real-c')


@pytest.mark.parametrize('name', list(CAPSULE_ENGINES))
def test_d_save_drop_everything_load_in_new_engine(tmp_path, name):
    engine = make_capsule_engine(tmp_path, name)
    session = engine.create_session()
    engine.append(session, BRIEFING)
    engine.snapshot(session, 'briefing')
    engine.save('briefing')
    expected = continue_greedy(engine, session)
    del engine
    fresh = make_capsule_engine(tmp_path, name)
    fresh.load('briefing')
    session = fresh.restore('briefing').session_id
    got = continue_greedy(fresh, session)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_e_sampling_restore_needs_the_rng_state(capsule_engine):
    engine = capsule_engine
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, seed=11)
    session = engine.create_session(sampling=sampling)
    engine.append(session, 'Invent a name for a delivery robot.')
    engine.generate(session, 4)
    engine.snapshot(session, 'real-e')
    first = engine.generate(session, 16).token_ids
    engine.restore('real-e')
    assert engine.generate(session, 16).token_ids == first
    generator = engine._sessions[session].generator
    left = generator.get_state()  # a restore of KV + logits, not the RNG: the last state stays
    engine.restore('real-e')
    generator.set_state(left)
    assert engine.generate(session, 16).token_ids != first
    engine.close_session(session)
    engine.release('real-e')
