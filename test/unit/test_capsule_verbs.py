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
"""Capsule verbs on a small model: exactness, copy-on-write, budget, errors, persistence."""

import threading

from capsule_ros.runtime.capsule import EventKind, Tier
from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.engine import StopReason
from capsule_ros.runtime.errors import (BudgetExceededError, CorruptCapsuleError,
                                        FingerprintMismatchError, InvalidArgumentError,
                                        SessionBusyError, UnknownCapsuleError,
                                        UnknownSessionError)
from capsule_ros.runtime.persist import MANIFEST_NAME, PAYLOAD_NAME
from conftest import make_engine
import pytest
import torch


def continuation(engine, session, steps=6):
    """Greedy tokens and the logits after them."""
    result = engine.generate(session, steps)
    return result.token_ids, engine.session_logits(session)


def test_snapshot_copies_no_kv_and_rollback_in_place_is_exact(tiny_engine):
    engine = tiny_engine
    session = engine.create_session()
    engine.append(session, 'The robot stands in the hallway.')
    info = engine.snapshot(session, 'hall')
    assert info.tier is Tier.SLOT and info.resident_in_slot
    assert engine.store.used_bytes == engine.capsule('hall').fixed_bytes  # no KV copied
    first = continuation(engine, session)
    result = engine.restore('hall')
    assert result.copied_bytes == 0 and result.session_id == session
    second = continuation(engine, session)
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])


def test_rollback_then_new_tokens_materializes_once(tiny_engine):
    engine = tiny_engine
    session = engine.create_session()
    engine.append(session, 'Briefing: fetch the red cup.')
    engine.snapshot(session, 'a')
    engine.append(session, 'Observation: the cup is on the table.')
    engine.snapshot(session, 'b')
    expected = continuation(engine, session)
    engine.restore('a')
    engine.append(session, 'Observation: the cup is gone.')  # overwrites b's positions
    b_info = next(info for info in engine.list_capsules() if info.capsule_id == 'b')
    assert b_info.tier is Tier.HOST
    used = engine.store.used_bytes
    engine.append(session, 'More text.')  # nothing more to save
    assert engine.store.used_bytes == used
    result = engine.restore('b')
    assert result.copied_bytes > 0
    assert continuation(engine, session)[0] == expected[0]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_restore_into_other_session_and_branch_are_bitwise(tiny_model_dir, tmp_path, dtype):
    engine = make_engine(tiny_model_dir, tmp_path, dtype=dtype)
    source = engine.create_session()
    engine.append(source, 'Plan a route to the dock.')
    engine.snapshot(source, 'route')
    expected = continuation(engine, source)
    other = engine.create_session()
    engine.append(other, 'unrelated words')
    engine.restore('route', other)
    got = continuation(engine, other)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    engine.close_session(other)
    children = engine.branch('route', 2)
    for child in children:
        got = continuation(engine, child)
        assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_branch_children_share_parent_bytes(tiny_engine):
    engine = tiny_engine
    session = engine.create_session()
    engine.append(session, 'A long shared briefing ' * 8)
    engine.snapshot(session, 'root')
    children = engine.branch('root', 3)
    for index, child in enumerate(children):
        engine.append(child, f'branch {index}')
        info = engine.snapshot(child, f'leaf{index}')
        assert info.parent_id == 'root'
        assert info.shared_bytes > 0
    root = engine.capsule('root')
    leaf = engine.capsule('leaf0')
    assert leaf.chain[:len(root.chain)] == root.chain  # the very same segment objects
    assert set(engine.store.children('root')) == {'leaf0', 'leaf1', 'leaf2'}


def test_sampling_restore_reproduces_only_with_rng_state(tiny_engine):
    engine = tiny_engine
    sampling = SamplingConfig(temperature=1.0, top_k=50, seed=7)
    session = engine.create_session(sampling=sampling)
    engine.append(session, 'Pick a random direction.')
    engine.generate(session, 3)  # advance the RNG past its seed
    engine.snapshot(session, 'mid')
    first = engine.generate(session, 12).token_ids
    engine.restore('mid')
    assert engine.generate(session, 12).token_ids == first
    # a restore that skips the RNG state (KV and logits only) does not reproduce: the
    # generator keeps the state the last generation left
    generator = engine._sessions[session].generator
    left = generator.get_state()
    engine.restore('mid')
    generator.set_state(left)
    assert engine.generate(session, 12).token_ids != first


def test_seeded_sessions_reproduce_and_different_seeds_diverge(tiny_engine):
    engine = tiny_engine
    runs = {}
    for name, seed in (('a', 1), ('b', 1), ('c', 2)):
        session = engine.create_session(sampling=SamplingConfig(temperature=1.0, seed=seed))
        engine.append(session, 'Say something.')
        runs[name] = engine.generate(session, 16).token_ids
        engine.close_session(session)
    assert runs['a'] == runs['b']
    assert runs['a'] != runs['c']


def test_budget_is_never_exceeded_and_lru_evicts_unpinned(tiny_model_dir, tmp_path):
    events = []
    engine = make_engine(tiny_model_dir, tmp_path, capsules={'budget_bytes': 700_000})
    engine.add_listener(events.append)
    session = engine.create_session()
    engine.append(session, 'start')
    engine.snapshot(session, 'pinned', pin=True)
    for index in range(6):
        engine.append(session, f'step {index}')
        engine.snapshot(session, f'c{index}')
        assert engine.store.used_bytes <= engine.store.budget_bytes
    evicted = [event.capsule_id for event in events if event.kind is EventKind.EVICTED]
    assert evicted and 'pinned' not in evicted
    assert evicted[0] == 'c0'  # least recently used first
    with pytest.raises(UnknownCapsuleError):
        engine.restore(evicted[0])
    assert 'pinned' in engine.store


def test_capsule_larger_than_budget_is_refused(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, capsules={'budget_bytes': 100_000})
    session = engine.create_session()
    engine.append(session, 'hello')
    with pytest.raises(BudgetExceededError, match='budget'):
        engine.snapshot(session, 'too-big')
    assert len(engine.store) == 0 and engine.store.used_bytes == 0
    assert engine.session_position(session) > 0  # session untouched


def test_bad_input_is_refused_with_typed_errors(tiny_engine):
    engine = tiny_engine
    session = engine.create_session()
    engine.append(session, 'hello')
    engine.snapshot(session, 'ok')
    with pytest.raises(UnknownCapsuleError):
        engine.restore('missing')
    with pytest.raises(UnknownSessionError):
        engine.snapshot('nobody')
    with pytest.raises(InvalidArgumentError):
        engine.snapshot(session, '../escape')
    with pytest.raises(InvalidArgumentError):
        engine.snapshot(session, 'ok')  # id in use
    with pytest.raises(InvalidArgumentError):
        engine.branch('ok', 10_000)
    with pytest.raises(InvalidArgumentError):
        engine.branch('ok', 0)
    with pytest.raises(InvalidArgumentError):
        engine.generate(session, -3)
    with pytest.raises(InvalidArgumentError):
        engine.append(session, tokens=[10 ** 9])
    with pytest.raises(InvalidArgumentError, match='max_seq_len'):
        engine.append(session, tokens=[5] * 1000)
    assert engine.session_position(session) == engine.capsule('ok').position
    engine.release('ok')
    with pytest.raises(UnknownCapsuleError):
        engine.release('ok')


def test_busy_session_is_refused_other_sessions_are_not(tiny_engine):
    engine = tiny_engine
    busy = engine.create_session()
    free = engine.create_session()
    engine.append(busy, 'one')
    engine.append(free, 'two')
    streaming = threading.Event()
    cancel = threading.Event()
    generation = threading.Thread(target=engine.generate, args=(busy, 200), kwargs={
        'on_token': lambda token, delta: streaming.set(), 'cancel': cancel})
    generation.start()  # a real generation holds the session
    try:
        assert streaming.wait(30)
        with pytest.raises(SessionBusyError):
            engine.snapshot(busy)
        with pytest.raises(SessionBusyError):
            engine.generate(busy, 2)
        with pytest.raises(SessionBusyError):
            engine.append(busy, 'more')
        engine.snapshot(free, 'free-ok')  # other sessions are not blocked
        engine.generate(free, 2)
    finally:
        cancel.set()
        generation.join(30)
    assert not generation.is_alive()
    engine.snapshot(busy, 'busy-done')  # free again once the generation ended


def test_save_load_roundtrip_in_a_new_engine(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session()
    engine.append(session, 'Resume after reboot.')
    engine.snapshot(session, 'boot')
    saved = engine.save('boot', 'boot-file')
    expected = continuation(engine, session)
    del engine
    fresh = make_engine(tiny_model_dir, tmp_path)
    info = fresh.load('boot-file')
    assert info.capsule_id == 'boot-file' and info.num_tokens > 0
    restored = fresh.restore('boot-file')
    got = continuation(fresh, restored.session_id)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    assert saved.bytes_written > 0


def test_corrupt_truncated_and_foreign_files_are_refused(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session()
    engine.append(session, 'payload')
    engine.snapshot(session, 'good')
    directory = engine.config.capsules.directory()
    for name in ('flip', 'trunc', 'manifest', 'foreign'):
        engine.save('good', name)
    payload = directory / 'flip' / PAYLOAD_NAME
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))
    with pytest.raises(CorruptCapsuleError, match='checksum'):
        engine.load('flip')
    payload = directory / 'trunc' / PAYLOAD_NAME
    payload.write_bytes(payload.read_bytes()[:100])
    with pytest.raises(CorruptCapsuleError, match='truncated'):
        engine.load('trunc')
    (directory / 'manifest' / MANIFEST_NAME).write_text('{not json')
    with pytest.raises(CorruptCapsuleError, match='JSON'):
        engine.load('manifest')
    manifest_path = directory / 'foreign' / MANIFEST_NAME
    manifest_path.write_text(manifest_path.read_text().replace(
        engine.fingerprint, 'f' * 32))
    with pytest.raises(FingerprintMismatchError):
        engine.load('foreign')
    for bad_name in ('../x', 'a/b', '..', '', '.hidden'):
        with pytest.raises(InvalidArgumentError):
            engine.load(bad_name)
    assert len(engine.store) == 1  # nothing else lost
    engine.save('good', 'intact')
    assert engine.load('intact').num_tokens == engine.capsule('good').position


def test_wrong_model_capsule_is_refused(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session()
    engine.append(session, 'hi')
    engine.snapshot(session, 'x')
    engine.save('x')
    other = make_engine(tiny_model_dir, tmp_path, dtype='bfloat16')
    with pytest.raises(FingerprintMismatchError):
        other.load('x')


def test_branch_children_inherit_the_sampler_settings(tiny_engine):
    """Sampler parameters are session state: a child samples like its parent would."""
    engine = tiny_engine
    sampling = SamplingConfig(temperature=0.9, top_k=40, seed=3)
    parent = engine.create_session(sampling=sampling)
    engine.snapshot(parent, 'empty')
    child = engine.branch('empty', 1)[0]
    reference = engine.create_session(sampling=sampling)
    for session in (child, reference):
        engine.append(session, 'stop go')
    assert engine.generate(child, 6).token_ids == engine.generate(reference, 6).token_ids


def test_slots_are_a_cache_of_sessions(tiny_model_dir, tmp_path):
    """Two slots hold ten open sessions; each continues exactly, used again in any order."""
    engine = make_engine(tiny_model_dir, tmp_path, engine={'max_sessions': 2})
    prompts = [f'Robot {index}: go to shelf {index} and wait there.' for index in range(10)]
    sessions = []
    for prompt in prompts:
        sessions.append(engine.create_session())
        engine.append(sessions[-1], prompt)
    assert len(engine.sessions()) == 10
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 2, 7, 0]
    visits = {index: [] for index in range(10)}
    for index in order:  # every use swaps the least recently used idle session out
        visits[index].append(engine.generate(sessions[index], 4).token_ids)
    assert engine.last_latencies['swap_out'] > 0 and engine.last_latencies['swap_in'] > 0
    reference = make_engine(tiny_model_dir, tmp_path / 'reference')  # 4 slots, no swapping
    for index, prompt in enumerate(prompts):
        uninterrupted = reference.create_session()
        reference.append(uninterrupted, prompt)
        for tokens in visits[index]:
            assert reference.generate(uninterrupted, 4).token_ids == tokens
        assert reference.session_tokens(uninterrupted) == engine.session_tokens(sessions[index])
        assert torch.equal(reference.session_logits(uninterrupted),
                           engine.session_logits(sessions[index]))
        reference.close_session(uninterrupted)
    engine.snapshot(sessions[4], 'four')  # capsule verbs on swapped-out sessions
    assert len(engine.branch('four', 3)) == 3
    engine.restore('four', sessions[9])
    assert engine.session_tokens(sessions[9]) == engine.session_tokens(sessions[4])
    for session in engine.sessions():  # the ten and the three children
        engine.close_session(session)
    assert engine.store.capsules(include_hidden=True) == [engine.capsule('four')]
    assert engine.store.used_bytes == engine.capsule('four').fixed_bytes + sum(
        segment.num_bytes for segment in engine.capsule('four').chain
        if segment.data is not None)


def test_all_slots_in_use_only_when_every_slot_is_generating(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, engine={'max_sessions': 2})
    generating = [engine.create_session() for _ in range(2)]
    idle = engine.create_session()  # a third session: the LRU idle one is swapped out
    cancel = threading.Event()
    started = [threading.Event() for _ in generating]
    threads = [threading.Thread(target=engine.generate, args=(session, 200), kwargs={
        'on_token': lambda token, delta, event=event: event.set(), 'cancel': cancel})
        for session, event in zip(generating, started)]
    for session in generating:
        engine.append(session, 'Count to a thousand.')
    for thread in threads:
        thread.start()
    try:
        assert all(event.wait(30) for event in started)
        with pytest.raises(BudgetExceededError, match='busy'):
            engine.create_session()
        with pytest.raises(BudgetExceededError, match='busy'):
            engine.append(idle, 'hello')  # swapped out, and no slot can be freed
    finally:
        cancel.set()
        for thread in threads:
            thread.join(30)
    engine.append(idle, 'hello')  # a slot is idle again
    assert len(engine.sessions()) == 3


def test_swap_refused_by_the_budget_loses_nothing(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, engine={'max_sessions': 2},
                         capsules={'budget_bytes': 150_000})  # < one session's state
    sessions = [engine.create_session() for _ in range(2)]
    for session in sessions:
        engine.append(session, 'A long enough briefing about the warehouse, its aisles and '
                               'its shelves, so that the state is larger than the budget.')
    before = {session: (engine.session_tokens(session), engine.session_logits(session))
              for session in sessions}
    with pytest.raises(BudgetExceededError, match='budget'):
        engine.create_session()
    assert engine.sessions() == sessions and engine.store.used_bytes == 0
    for session in sessions:
        assert engine.session_tokens(session) == before[session][0]
        assert torch.equal(engine.session_logits(session), before[session][1])


def test_cancel_stops_before_the_next_token_at_a_clean_boundary(tiny_engine):
    """A cancel set while token k streams ends the generation with exactly k tokens."""
    engine = tiny_engine
    session = engine.create_session()
    engine.append(session, 'Count slowly.')
    cancel = threading.Event()
    streamed = []

    def on_token(token_id, text_delta):
        streamed.append(token_id)
        if len(streamed) == 3:
            cancel.set()

    result = engine.generate(session, 100, on_token=on_token, cancel=cancel)
    assert result.stop_reason is StopReason.CANCELED
    assert list(result.token_ids) == streamed and len(streamed) == 3
    # the session holds exactly those tokens and continues like a session that never stopped
    journal = engine.session_tokens(session)
    assert journal[-3:] == streamed
    engine.snapshot(session, 'after-cancel')
    assert engine.generate(session, 2, reply=False).token_ids
