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
Property test: random sequences of capsule verbs never diverge from a replay from scratch.

Every session and capsule carries the list of operations that built it. After each step the
touched session is checked against a fresh session that replays those operations: the token
journal must be equal and the last logits bitwise equal. The store's byte count is checked
against the budget after every step, and evictions may only hit unpinned capsules.
"""

from capsule_ros.runtime.capsule import EventKind
from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.errors import BudgetExceededError
from conftest import make_engine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (initialize, invariant, precondition, rule,
                                 RuleBasedStateMachine)
import pytest
import torch

WORDS = ['go', 'left', 'stop', 'cup', 'door', 'red', 'robot', 'table', 'wait', 'see']
MAX_TOKENS_BEFORE_OP = 180  # of max_seq_len 256: room for one more operation
SAMPLING = SamplingConfig(temperature=0.9, top_k=40, seed=3)


class CapsuleMachine(RuleBasedStateMachine):
    """Drives one engine; the reference is a replay in a spare slot."""

    engine = None  # set by the test (one engine for all examples: loading is the slow part)

    @initialize()
    def reset(self):
        engine = self.engine
        for session in engine.sessions():
            engine.close_session(session)
        for info in engine.list_capsules():
            engine.store.set_pinned(info.capsule_id, False)
            engine.release(info.capsule_id)
        self.histories = {}   # session id -> operations
        self.capsules = {}    # capsule id -> (operations, pinned)
        self.released = set()
        self.evicted = []
        self.counter = 0
        engine._listeners[:] = [self._on_event]

    def _on_event(self, event):
        if event.kind is EventKind.EVICTED:
            self.evicted.append(event.capsule_id)

    # -- reference ------------------------------------------------------------------------

    def _replay_matches(self, session_id):
        engine = self.engine
        reference = engine.create_session(sampling=SAMPLING, system_prompt=False)
        try:
            for operation, argument in self.histories[session_id]:
                if operation == 'append':
                    engine.append(reference, argument)
                else:
                    engine.generate(reference, argument)
            assert engine.session_tokens(reference) == engine.session_tokens(session_id)
            if engine.session_position(reference):
                assert torch.equal(engine.session_logits(reference),
                                   engine.session_logits(session_id))
        finally:
            engine.close_session(reference)

    def _sync_evictions(self):
        for capsule_id in self.evicted:
            operations, pinned = self.capsules.pop(capsule_id)
            assert not pinned, f'pinned capsule {capsule_id} was evicted'
        self.evicted.clear()

    def _length(self, session_id):
        return self.engine.session_position(session_id)

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.histories) < 3)
    @rule()
    def create(self):
        session = self.engine.create_session(sampling=SAMPLING, system_prompt=False)
        self.histories[session] = []

    @precondition(lambda self: self.histories)
    @rule(data=st.data(), words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
    def append(self, data, words):
        session = data.draw(st.sampled_from(sorted(self.histories)))
        if self._length(session) > MAX_TOKENS_BEFORE_OP:
            return
        text = ' '.join(words)
        self.engine.append(session, text)
        self.histories[session].append(('append', text))
        self._sync_evictions()
        self._replay_matches(session)

    @precondition(lambda self: self.histories)
    @rule(data=st.data(), steps=st.integers(1, 4))
    def generate(self, data, steps):
        session = data.draw(st.sampled_from(sorted(self.histories)))
        if not self._length(session) or self._length(session) > MAX_TOKENS_BEFORE_OP:
            return
        self.engine.generate(session, steps)
        self.histories[session].append(('generate', steps))
        self._sync_evictions()
        self._replay_matches(session)

    @precondition(lambda self: self.histories)
    @rule(data=st.data(), pin=st.booleans())
    def snapshot(self, data, pin):
        session = data.draw(st.sampled_from(sorted(self.histories)))
        self.counter += 1
        label = f'k{self.counter}'
        try:
            self.engine.snapshot(session, label, pin=pin)
        except BudgetExceededError:
            assert label not in self.engine.store
            return
        self.capsules[label] = (list(self.histories[session]), pin)
        self._sync_evictions()

    @precondition(lambda self: self.capsules)
    @rule(data=st.data(), into_other=st.booleans())
    def restore(self, data, into_other):
        capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
        target = ''
        if into_other and self.histories:
            target = data.draw(st.sampled_from(sorted(self.histories)))
        elif len(self.histories) >= 3:
            target = sorted(self.histories)[0]
        try:
            result = self.engine.restore(capsule_id, target)
        except BudgetExceededError:
            return  # copy-on-write needed room that pinned capsules hold
        self._sync_evictions()
        self.histories[result.session_id] = list(self.capsules[capsule_id][0])
        self._replay_matches(result.session_id)

    @precondition(lambda self: self.capsules and len(self.histories) < 3)
    @rule(data=st.data())
    def branch(self, data):
        capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
        count = data.draw(st.integers(1, 3 - len(self.histories)))
        children = self.engine.branch(capsule_id, count)
        for child in children:
            self.histories[child] = list(self.capsules[capsule_id][0])
        self._sync_evictions()
        self._replay_matches(children[-1])

    @precondition(lambda self: self.capsules)
    @rule(data=st.data())
    def release(self, data):
        capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
        self.engine.release(capsule_id)
        del self.capsules[capsule_id]

    @precondition(lambda self: self.capsules)
    @rule(data=st.data())
    def save_and_load(self, data):
        capsule_id = data.draw(st.sampled_from(sorted(self.capsules)))
        self.counter += 1
        name = f'f{self.counter}'
        self.engine.save(capsule_id, name)
        operations = self.capsules[capsule_id][0]
        try:
            self.engine.load(name)
        except BudgetExceededError:
            assert name not in self.engine.store
            return
        self._sync_evictions()
        self.capsules[name] = (list(operations), False)

    @precondition(lambda self: self.histories)
    @rule(data=st.data())
    def close(self, data):
        session = data.draw(st.sampled_from(sorted(self.histories)))
        self.engine.close_session(session)
        del self.histories[session]
        self._sync_evictions()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def within_budget_and_accounted(self):
        store = self.engine.store
        assert store.used_bytes <= store.budget_bytes
        counted = sum(capsule.fixed_bytes for capsule in store.capsules())
        segments = {segment for capsule in store.capsules() for segment in capsule.chain}
        counted += sum(segment.num_bytes for segment in segments if segment.data is not None)
        assert counted == store.used_bytes
        for segment in segments:  # every live segment's bytes exist somewhere
            assert segment.data is not None or segment.residences
        assert set(self.capsules) == {capsule.capsule_id for capsule in store.capsules()}


@pytest.mark.parametrize('budget_bytes', [1_200_000, 64 << 20])
def test_random_capsule_programs_match_replay(tiny_model_dir, tmp_path, budget_bytes):
    """Hundreds of random programs, with a tight budget (evictions) and a roomy one."""
    CapsuleMachine.engine = make_engine(tiny_model_dir, tmp_path,
                                        capsules={'budget_bytes': budget_bytes})
    CapsuleMachine.engine.config.capsules.directory().mkdir(parents=True, exist_ok=True)
    machine_test = CapsuleMachine.TestCase
    machine_test.settings = settings(
        max_examples=125, stateful_step_count=20, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck))
    machine_test('runTest').runTest()
