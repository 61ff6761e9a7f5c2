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
Capsule files that are damaged, crafted or hostile; session identity; transactional load.

Every malformed input must be refused with a typed error while the engine keeps working: a
restore of another capsule continues bit for bit, no other capsule or session changes, and
the store's byte count stays exact. A crafted file is "self-consistent": its checksums are
recomputed after the edit, as a careless tool or an attacker would.
"""

import hashlib
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

from capsule_ros.runtime import persist
from capsule_ros.runtime.engine import SCALAR_POSITION, SCALAR_TOP_K, SCALAR_TURN
from capsule_ros.runtime.errors import (BudgetExceededError, CapsuleIOError, ContextFullError,
                                        CorruptCapsuleError, InvalidArgumentError,
                                        UnknownCapsuleError)
from capsule_ros.runtime.persist import MANIFEST_NAME, PAYLOAD_NAME
from capsule_ros.runtime.testing import write_tiny_model
from conftest import make_engine
import pytest
from safetensors.torch import load as load_tensors, save as save_tensors
import torch

HERE = Path(__file__).resolve().parent
FAMILIES = ['llama', 'qwen3_5_text']


@pytest.fixture(scope='module')
def hybrid_model_dir(tmp_path_factory):
    """Qwen3.5 (Gated DeltaNet + attention): its conv and recurrent state are fixed tensors."""
    return write_tiny_model(tmp_path_factory.mktemp('tiny-qwen3_5'), family='qwen3_5_text')


@pytest.fixture(params=FAMILIES)
def model_dir(request):
    """Return the tiny Llama, then the tiny hybrid checkpoint."""
    if request.param == 'llama':
        return request.getfixturevalue('tiny_model_dir')
    return request.getfixturevalue('hybrid_model_dir')


# -- observing an engine ------------------------------------------------------------------


def accounted_bytes(store):
    """Return what ``used_bytes`` must be: every capsule's fixed state + pool segments."""
    capsules = store.capsules(include_hidden=True)  # swapped-out sessions count too
    segments = {segment for capsule in capsules for segment in capsule.chain}
    return (sum(capsule.fixed_bytes for capsule in capsules)
            + sum(segment.num_bytes for segment in segments if segment.data is not None))


def assert_budget_exact(engine):
    """Check the byte count is exact and within the budget, and no segment is orphaned."""
    store = engine.store
    assert store.used_bytes == accounted_bytes(store)
    assert store.used_bytes <= store.budget_bytes
    capsules = store.capsules(include_hidden=True)
    live = {segment.uid: segment for capsule in capsules for segment in capsule.chain}
    for uid, segment in live.items():
        assert store.segment_by_uid(uid) is segment
        assert segment.capsule_refs == sum(segment in capsule.chain for capsule in capsules)


def capsule_state(engine, capsule_id):
    """Position, token journal (from its chain) and last logits of a live capsule."""
    capsule = engine.capsule(capsule_id)
    tokens = [token for segment in capsule.chain
              for token in segment.read(engine.layout)['tokens'].tolist()]
    return capsule.position, tokens, capsule.fixed['last_logits'].clone()


def engine_state(engine):
    """Every session's journal and logits, every capsule's state."""
    sessions = {}
    for session_id in engine.sessions():
        position = engine.session_position(session_id)
        logits = engine.session_logits(session_id) if position else None
        sessions[session_id] = (engine.session_tokens(session_id), logits)
    capsules = {info.capsule_id: capsule_state(engine, info.capsule_id)
                for info in engine.list_capsules()}
    return sessions, capsules, engine.store.used_bytes


def assert_same_state(got, expected):
    """Equal sessions and capsules, bitwise."""
    got_sessions, got_capsules, got_used = got
    sessions, capsules, used = expected
    assert got_sessions.keys() == sessions.keys()
    for session_id, (tokens, logits) in sessions.items():
        assert got_sessions[session_id][0] == tokens, session_id
        assert (logits is None) == (got_sessions[session_id][1] is None)
        assert logits is None or torch.equal(got_sessions[session_id][1], logits), session_id
    assert got_capsules.keys() == capsules.keys()
    for capsule_id, (position, tokens, logits) in capsules.items():
        got_position, got_tokens, got_logits = got_capsules[capsule_id]
        assert (got_position, got_tokens) == (position, tokens), capsule_id
        assert torch.equal(got_logits, logits), capsule_id
    assert got_used == used


def continue_from(engine, capsule_id, steps=4):
    """Restore a capsule into a fresh session, continue greedily, close the session again."""
    session = engine.create_session(system_prompt=False)
    try:
        engine.restore(capsule_id, session)
        tokens = engine.generate(session, steps, reply=False).token_ids
        return engine.session_tokens(session), tokens, engine.session_logits(session)
    finally:
        engine.close_session(session)


def assert_same_continuation(got, expected):
    """Equal journal, continuation and logits."""
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def engine_loads(engine, name):
    """Whether ``name`` loads (and release it again)."""
    try:
        engine.load(name)
    except (CorruptCapsuleError, CapsuleIOError, UnknownCapsuleError):
        return False
    engine.release(name)
    return True


# -- editing files ------------------------------------------------------------------------


def files_of(directory, name):
    """Manifest and payload paths of a saved capsule, through its name."""
    return directory / name / MANIFEST_NAME, directory / name / PAYLOAD_NAME


def manifest_digest(manifest):
    """Digest as the format defines it: sha256 of canonical JSON without the payload fields."""
    body = {key: value for key, value in manifest.items()
            if key not in ('payload_sha256', 'payload_bytes')}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def forge(directory, name, edit):
    """Apply ``edit(manifest, tensors)`` to a saved capsule and recompute every checksum."""
    manifest_path, payload_path = files_of(directory, name)
    manifest = json.loads(manifest_path.read_text())
    tensors = {key: value.clone() for key, value in
               load_tensors(payload_path.read_bytes()).items()}
    edit(manifest, tensors)
    metadata = {'format': 'pt', 'magic': persist.MAGIC,
                'manifest_sha256': manifest_digest(manifest)}
    payload = save_tensors(tensors, metadata=metadata)
    manifest['payload_sha256'] = hashlib.sha256(payload).hexdigest()
    manifest['payload_bytes'] = len(payload)
    payload_path.unlink()
    payload_path.write_bytes(payload)
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(manifest, indent=1))


def flip_bit(path, offset):
    """Flip the lowest bit of one byte, in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def set_scalar(index, value):
    """Edit: one of the fixed ``scalars`` (position, turn, ...)."""
    def edit(manifest, tensors):
        tensors['fixed.scalars'][index] = value
    return edit


def set_field(key, value):
    """Edit: one manifest field."""
    def edit(manifest, tensors):
        manifest[key] = value
    return edit


# -- the malformed inputs -------------------------------------------------------------------
# Each case gets a fresh save of capsule 'keep' named after the case, damages it, and returns
# (name to load, expected error class).


def truncated(world, name):
    _, payload = files_of(world.directory, name)
    payload.write_bytes(payload.read_bytes()[:payload.stat().st_size // 2])
    return name, CorruptCapsuleError


def payload_bit_flip(world, name):
    _, payload = files_of(world.directory, name)
    flip_bit(payload, payload.stat().st_size - 3)  # in the tensor data
    return name, CorruptCapsuleError


def payload_header_bit_flip(world, name):
    _, payload = files_of(world.directory, name)
    flip_bit(payload, 40)  # in the safetensors JSON header
    return name, CorruptCapsuleError


def manifest_bit_flip(world, name):
    # a flip that keeps the JSON valid and the value plausible: only an integrity check sees it
    manifest, _ = files_of(world.directory, name)
    text = manifest.read_text()
    offset = text.index('"created": ') + len('"created": ') + 3
    assert text[offset].isdigit()
    flip_bit(manifest, offset)
    return name, CorruptCapsuleError


def manifest_label_bit_flip(world, name):
    manifest, _ = files_of(world.directory, name)
    text = manifest.read_text()
    flip_bit(manifest, text.index('"label": "keep"') + len('"label": "') + 1)  # 'keep'->'kdep'
    return name, CorruptCapsuleError


def position_past_its_data(world, name):
    position = world.engine.capsule('keep').position
    forge(world.directory, name, set_scalar(SCALAR_POSITION, position + 7))
    return name, CorruptCapsuleError


def manifest_position_past_its_data(world, name):
    def edit(manifest, tensors):
        manifest['position'] += 7
        manifest['segments'][-1]['end'] += 7
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def nan_created(world, name):
    forge(world.directory, name, set_field('created', float('nan')))
    return name, CorruptCapsuleError


def infinite_created(world, name):
    forge(world.directory, name, set_field('created', float('inf')))
    return name, CorruptCapsuleError


def negative_created(world, name):
    forge(world.directory, name, set_field('created', -5.0))
    return name, CorruptCapsuleError


def bad_turn_state(world, name):
    forge(world.directory, name, set_scalar(SCALAR_TURN, 7))
    return name, CorruptCapsuleError


def negative_top_k(world, name):
    forge(world.directory, name, set_scalar(SCALAR_TOP_K, -3))
    return name, CorruptCapsuleError


def nan_temperature(world, name):
    def edit(manifest, tensors):
        tensors['fixed.sampler'][0] = float('nan')
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def wrong_rng_size(world, name):
    def edit(manifest, tensors):
        tensors['fixed.rng_state'] = tensors['fixed.rng_state'][:-16].clone()
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def garbage_rng_state(world, name):
    def edit(manifest, tensors):
        tensors['fixed.rng_state'].fill_(0)
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def wrong_fixed_shape(world, name):
    # the hybrid's conv state, else the last logits
    spec = next((spec for spec in world.engine.layout.fixed_specs if spec.kind.value == 'conv'),
                world.engine.layout.by_name['last_logits'])

    def edit(manifest, tensors):
        tensor = tensors[f'fixed.{spec.name}']
        tensors[f'fixed.{spec.name}'] = torch.cat([tensor.flatten(), tensor.flatten()[:1]])
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def extra_tensor(world, name):
    def edit(manifest, tensors):
        tensors['fixed.smuggled'] = torch.zeros(4)
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def label_not_a_plain_name(world, name):
    forge(world.directory, name, set_field('label', '../../etc/passwd'))
    return name, CorruptCapsuleError


def id_not_a_plain_name(world, name):
    forge(world.directory, name, set_field('capsule_id', 'a/b'))
    return name, CorruptCapsuleError


def session_not_a_plain_name(world, name):
    forge(world.directory, name, set_field('session_id', 's0\nforged'))
    return name, CorruptCapsuleError


def unknown_manifest_field(world, name):
    forge(world.directory, name, set_field('execute', 'rm -rf /'))
    return name, CorruptCapsuleError


def segment_uid_not_hex(world, name):
    def edit(manifest, tensors):
        manifest['segments'][0]['uid'] = '../' * 4
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def segment_uid_of_other_contents(world, name):
    # claims the uid of a live segment while carrying other tokens: never silently shared
    live_uid = world.engine.capsule('other').chain[0].uid

    def edit(manifest, tensors):
        manifest['segments'][0]['uid'] = live_uid
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def absurd_position(world, name):
    def edit(manifest, tensors):
        manifest['position'] = 10 ** 15
        manifest['segments'][-1]['end'] = 10 ** 15
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def billion_tokens(world, name):
    # within any sanity bound, beyond this engine's slots, and beyond what the payload holds
    def edit(manifest, tensors):
        manifest['position'] = 10 ** 9
        manifest['segments'][-1]['end'] = 10 ** 9
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def reshaped_fixed_tensor(world, name):
    # the same bytes in another shape: only the per-tensor check sees it
    def edit(manifest, tensors):
        tensors['fixed.last_logits'] = tensors['fixed.last_logits'].reshape(2, -1).clone()
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def renamed_tensor(world, name):
    def edit(manifest, tensors):
        tensors['fixed.last_logit'] = tensors.pop('fixed.last_logits')
    forge(world.directory, name, edit)
    return name, CorruptCapsuleError


def absurd_payload_bytes(world, name):
    manifest_path, _ = files_of(world.directory, name)
    manifest = json.loads(manifest_path.read_text())
    manifest['payload_bytes'] = 10 ** 15
    manifest_path.write_text(json.dumps(manifest))
    return name, CorruptCapsuleError


def outside_copy(world, name):
    """Copy capsule ``name``'s files (complete, valid) outside the capsule directory."""
    outside = world.outside / name
    shutil.copytree(world.directory / name, outside)  # follows the name: real files
    return outside


def dir_link_outside(world, name):
    outside = outside_copy(world, name)
    link = f'{name}-link'
    os.symlink(outside, world.directory / link)
    return link, CorruptCapsuleError


def dir_link_inside(world, name):
    link = f'{name}-link'
    os.symlink(name, world.directory / link)  # a sibling that loads on its own
    return link, CorruptCapsuleError


def dir_link_to_a_version(world, name):
    link = f'{name}-link'
    os.symlink(os.readlink(world.directory / 'good') if (world.directory / 'good').is_symlink()
               else 'good', world.directory / link)
    return link, CorruptCapsuleError


def manifest_link_outside(world, name):
    outside = outside_copy(world, name)
    manifest, _ = files_of(world.directory, name)
    manifest.unlink()
    os.symlink(outside / MANIFEST_NAME, manifest)
    return name, CorruptCapsuleError


def manifest_link_inside(world, name):
    manifest, _ = files_of(world.directory, name)
    copy = manifest.with_name('manifest-copy.json')
    shutil.copy(manifest, copy)
    manifest.unlink()
    os.symlink(copy.name, manifest)
    return name, CorruptCapsuleError


def payload_link_outside(world, name):
    outside = outside_copy(world, name)
    _, payload = files_of(world.directory, name)
    payload.unlink()
    os.symlink(outside / PAYLOAD_NAME, payload)
    return name, CorruptCapsuleError


def payload_link_inside(world, name):
    _, payload = files_of(world.directory, name)
    copy = payload.with_name('payload-copy.safetensors')
    shutil.copy(payload, copy)
    payload.unlink()
    os.symlink(copy.name, payload)
    return name, CorruptCapsuleError


def dangling_link(world, name):
    link = f'{name}-link'
    os.symlink('nowhere', world.directory / link)
    return link, CorruptCapsuleError


def fifo_manifest(world, name):
    directory = world.directory / f'{name}-real'
    directory.mkdir()
    shutil.copy(world.directory / name / PAYLOAD_NAME, directory / PAYLOAD_NAME)
    os.mkfifo(directory / MANIFEST_NAME)
    return directory.name, CorruptCapsuleError


def directory_manifest(world, name):
    directory = world.directory / f'{name}-real'
    directory.mkdir()
    shutil.copy(world.directory / name / PAYLOAD_NAME, directory / PAYLOAD_NAME)
    (directory / MANIFEST_NAME).mkdir()
    return directory.name, CorruptCapsuleError


def entry_not_a_directory(world, name):
    (world.directory / f'{name}-file').write_text('not a capsule')
    return f'{name}-file', CorruptCapsuleError


CASES = [truncated, payload_bit_flip, payload_header_bit_flip, manifest_bit_flip,
         manifest_label_bit_flip, position_past_its_data, manifest_position_past_its_data,
         nan_created, infinite_created, negative_created, bad_turn_state, negative_top_k,
         nan_temperature, wrong_rng_size, garbage_rng_state, wrong_fixed_shape, extra_tensor,
         label_not_a_plain_name, id_not_a_plain_name, session_not_a_plain_name,
         unknown_manifest_field, segment_uid_not_hex, segment_uid_of_other_contents,
         absurd_position, billion_tokens, reshaped_fixed_tensor, renamed_tensor,
         absurd_payload_bytes, dir_link_outside, dir_link_inside,
         dir_link_to_a_version, manifest_link_outside, manifest_link_inside,
         payload_link_outside, payload_link_inside, dangling_link, fifo_manifest,
         directory_manifest, entry_not_a_directory]


# links, entries that are not directories, manifests that are not regular files
STRUCTURAL_CASES = [dir_link_outside, dir_link_inside, dir_link_to_a_version,
                    manifest_link_outside, manifest_link_inside, payload_link_outside,
                    payload_link_inside, dangling_link, fifo_manifest, directory_manifest,
                    entry_not_a_directory]


class World:
    """An engine with live sessions and capsules, and one good saved capsule."""

    def __init__(self, engine, tmp_path):
        self.engine = engine
        self.directory = engine.config.capsules.directory()
        self.outside = tmp_path / 'outside'
        self.outside.mkdir()
        source = engine.create_session(system_prompt=False)
        engine.append(source, 'The robot stands in the kitchen next to the sink. ' * 3)
        engine.snapshot(source, 'keep')
        engine.append(source, 'It sees a red cup.')
        engine.snapshot(source, 'keep-child', pin=True)
        other = engine.create_session(system_prompt=False)
        engine.append(other, 'Unrelated words about the weather on the dock.')
        engine.snapshot(other, 'other')
        engine.append(other, 'More about rain.')
        engine.save('keep', 'good')
        self.expected = continue_from(engine, 'keep')
        self.loads = ['good']

    def check_refused(self, case):
        """Run one malformed input and check everything the contract promises."""
        engine = self.engine
        name = case.__name__.replace('_', '-')
        engine.save('keep', name)
        before = engine_state(engine)
        load_name, error_class = case(self, name)
        with pytest.raises(error_class) as refused:
            engine.load(load_name)
        assert type(refused.value) is error_class, (case.__name__, refused.value)
        assert str(refused.value), case.__name__
        assert_same_state(engine_state(engine), before)
        assert_budget_exact(engine)
        assert_same_continuation(continue_from(engine, 'keep'), self.expected)
        if case in STRUCTURAL_CASES:  # list shows only what could load
            assert load_name not in engine.saved_capsules(), case.__name__


def test_every_malformed_capsule_is_refused_and_changes_nothing(model_dir, tmp_path):
    """Each class of bad file: a typed error, nothing else changes, the engine works on."""
    engine = make_engine(model_dir, tmp_path)
    world = World(engine, tmp_path)
    for case in CASES:
        world.check_refused(case)
    # unreadable entries: list skips them instead of failing
    directory = world.directory
    os.mkdir(os.fsencode(directory) + b'/bad-\xff-name')
    (directory / 'empty-dir').mkdir()
    sealed = directory / 'sealed'
    sealed.mkdir()
    sealed.chmod(0)
    try:
        listed = engine.saved_capsules()
    finally:
        sealed.chmod(0o755)
    assert 'good' in listed
    for name in listed:
        assert name.isascii() and name.isprintable()
    # the good capsule loads and continues exactly like the live one
    engine.load('good')
    assert_same_continuation(continue_from(engine, 'good'), world.expected)
    assert_budget_exact(engine)


def test_listed_names_are_exactly_the_loadable_ones(tiny_model_dir, tmp_path):
    """``list`` shows a name only when it could load: no links, no half capsules."""
    engine = make_engine(tiny_model_dir, tmp_path)
    world = World(engine, tmp_path)
    for case in STRUCTURAL_CASES:
        name = case.__name__.replace('_', '-')
        engine.save('keep', name)
        case(world, name)
    directory = world.directory
    os.mkdir(os.fsencode(directory) + b'/bad-\xff-name')
    (directory / 'empty-dir').mkdir()
    (directory / 'half').mkdir()
    shutil.copy(directory / 'good' / MANIFEST_NAME, directory / 'half' / MANIFEST_NAME)
    listed = engine.saved_capsules()
    loadable = [name for name in sorted(os.listdir(directory))
                if not name.startswith('.') and name.isprintable()
                and engine_loads(engine, name)]
    assert listed == loadable
    assert 'good' in listed and 'dir-link-inside-link' not in listed


def test_file_rewritten_in_place_after_load_does_not_reach_the_engine(model_dir, tmp_path):
    """Loaded tensors own their memory: truncating and rewriting the file changes nothing."""
    engine = make_engine(model_dir, tmp_path)
    world = World(engine, tmp_path)
    engine.load('good')
    _, payload = files_of(world.directory, 'good')
    size = payload.stat().st_size
    with open(payload, 'r+b') as stream:  # in place: same inode, as an editor or a copy would
        stream.truncate(0)
        stream.flush()
        os.fsync(stream.fileno())
        stream.write(b'\xa5' * size)
    assert_same_continuation(continue_from(engine, 'good'), world.expected)
    engine.release('good')
    with pytest.raises(CorruptCapsuleError):
        engine.load('good')
    assert_budget_exact(engine)


def test_capsule_longer_than_the_slots_is_invalid_argument(tiny_model_dir, tmp_path):
    """A genuine capsule longer than this engine's slots: INVALID_ARGUMENT, not corrupt."""
    long_engine = make_engine(tiny_model_dir, tmp_path, engine={'max_seq_len': 512})
    session = long_engine.create_session(system_prompt=False)
    long_engine.append(session, tokens=list(range(1000, 1300)))
    long_engine.snapshot(session, 'long')
    long_engine.save('long')
    del long_engine
    engine = make_engine(tiny_model_dir, tmp_path)  # max_seq_len 256
    with pytest.raises(InvalidArgumentError, match='max_seq_len') as refused:
        engine.load('long')
    assert not isinstance(refused.value, CorruptCapsuleError)
    assert len(engine.store) == 0 and engine.store.used_bytes == 0


# -- item: session identity across processes ----------------------------------------------


def test_loaded_capsule_never_restores_into_an_unrelated_session(tiny_model_dir, tmp_path):
    """After a restart, session ids repeat; a loaded capsule must not take over a live one."""
    first = make_engine(tiny_model_dir, tmp_path)
    old = first.create_session(system_prompt=False)
    first.append(old, 'The conversation from before the restart.')
    first.snapshot(old, 'before-restart')
    first.save('before-restart')
    alpha = first.create_session('alpha', system_prompt=False)
    first.append(alpha, 'A named session from before the restart.')
    first.snapshot(alpha, 'alpha-before')
    first.save('alpha-before')
    del first

    second = make_engine(tiny_model_dir, tmp_path)
    live = second.create_session(system_prompt=False)
    second.append(live, 'A live conversation that nobody asked to overwrite.')
    named = second.create_session('alpha', system_prompt=False)
    second.append(named, 'Another live conversation, same name as before the restart.')
    before = engine_state(second)
    for name in ('before-restart', 'alpha-before'):
        info = second.load(name)
        assert info.session_id not in second.sessions()
        result = second.restore(name)  # empty session id: its own session, which is gone
        assert result.session_id not in (live, named)
        assert second.session_tokens(result.session_id) == capsule_state(second, name)[1]
        before[0][result.session_id] = (second.session_tokens(result.session_id),
                                        second.session_logits(result.session_id))
        before[1][name] = capsule_state(second, name)
    sessions, _, _ = engine_state(second)
    for session_id in (live, named):
        assert sessions[session_id][0] == before[0][session_id][0]
        assert torch.equal(sessions[session_id][1], before[0][session_id][1])


def test_loaded_capsule_returns_to_its_own_session_only_while_it_lives(tiny_engine):
    """Saved and loaded in one engine, a capsule restores into its session while it is open."""
    engine = tiny_engine
    session = engine.create_session('alpha', system_prompt=False)
    engine.append(session, 'Where the capsule was taken.')
    engine.snapshot(session, 'here')
    engine.save('here', 'here-file')
    engine.append(session, 'The session moved on.')
    info = engine.load('here-file')
    assert info.session_id == session
    assert engine.restore('here-file').session_id == session
    assert engine.session_tokens(session) == capsule_state(engine, 'here')[1]
    # closed and opened again under the same name: another conversation
    engine.release('here-file')
    engine.close_session(session)
    engine.create_session('alpha', system_prompt=False)
    engine.append('alpha', 'A new conversation under an old name.')
    tokens = engine.session_tokens('alpha')
    info = engine.load('here-file')
    assert info.session_id != 'alpha'
    assert engine.restore('here-file').session_id != 'alpha'
    assert engine.session_tokens('alpha') == tokens


# -- item: create_session cleans up -------------------------------------------------------


def test_create_session_frees_the_slot_when_the_system_prompt_fails(tiny_model_dir, tmp_path):
    """A system prompt that does not fit fails create_session and leaks no slot."""
    engine = make_engine(tiny_model_dir, tmp_path,
                         engine={'system_prompt': 'robot ' * 400})  # more than 256 tokens
    for _ in range(engine.config.engine.max_sessions + 1):
        with pytest.raises(ContextFullError):
            engine.create_session()
    assert engine.sessions() == []
    opened = [engine.create_session(system_prompt=False)
              for _ in range(engine.config.engine.max_sessions)]
    assert len(set(opened)) == engine.config.engine.max_sessions


# -- item: a failed load changes nothing --------------------------------------------------


def build_eviction_scene(engine):
    """
    Capsule 'u' (unpinned, materialized after its session closed), pinned 'p', and file 'v'.

    'v' is u's child: loading it shares u's segment and needs one fresh segment more.
    """
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'A briefing that two capsules share, long enough to matter. ' * 2)
    engine.snapshot(session, 'u')
    engine.append(session, 'What only the child has.')
    engine.snapshot(session, 'v')
    engine.save('v', 'v-file')
    engine.release('v')
    engine.close_session(session)  # u's segment is copied to the pool
    pinned = engine.create_session(system_prompt=False)
    engine.append(pinned, 'Pinned work.')
    engine.snapshot(pinned, 'p', pin=True)


def test_failed_load_evicts_nothing_and_keeps_the_budget_exact(tiny_model_dir, tmp_path):
    """A load that cannot fit after evicting is refused before it evicts anything."""
    probe = make_engine(tiny_model_dir, tmp_path / 'probe')
    build_eviction_scene(probe)
    used = probe.store.used_bytes
    u_segment = probe.capsule('u').chain[-1]
    probe.load('v-file')
    extra = probe.capsule('v-file').chain[-1].num_bytes
    assert probe.capsule('v-file').chain[0] is u_segment  # shared again
    del probe
    # evicting u frees its fixed state only (its segment is held for v), one byte short
    budget = used + extra - 1
    engine = make_engine(tiny_model_dir, tmp_path / 'tight', capsules={'budget_bytes': budget})
    build_eviction_scene(engine)
    assert engine.store.used_bytes == used
    events = []
    engine.add_listener(events.append)
    before = engine_state(engine)
    with pytest.raises(BudgetExceededError):
        engine.load('v-file')
    assert events == []  # nothing evicted
    assert_same_state(engine_state(engine), before)
    assert_budget_exact(engine)
    # with room for it, the same load evicts u and succeeds
    engine.release('p')
    engine.load('v-file')
    assert_budget_exact(engine)


# -- item: a full disk --------------------------------------------------------------------

FULL_DISK_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from conftest import make_engine
from capsule_ros.runtime.errors import CapsuleRosError
engine = make_engine(Path(sys.argv[1]), Path(sys.argv[2]))
session = engine.create_session(system_prompt=False)
engine.append(session, 'Words to fill a capsule. ' * 8)
engine.snapshot(session, 'cap')
engine.save('cap', 'existing')
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
results = {}
for name in ('new-name', 'existing'):
    try:
        engine.save('cap', name)
        results[name] = 'saved'
    except CapsuleRosError as error:
        results[name] = [type(error).__name__, error.code, str(error)]
    except Exception as error:
        results[name] = ['untyped ' + type(error).__name__, 'INTERNAL', str(error)]
print(json.dumps(results))
"""


def test_full_disk_is_io_error_and_leaves_nothing_behind(tiny_model_dir, tmp_path):
    """Writes that fail at the OS (a file size limit: EFBIG, like ENOSPC) give IO_ERROR."""
    child = subprocess.run(
        [sys.executable, '-c', FULL_DISK_CHILD, str(tiny_model_dir), str(tmp_path), str(HERE)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for name in ('new-name', 'existing'):
        assert results[name][:2] == ['CapsuleIOError', 'IO_ERROR'], results
    directory = tmp_path / 'capsules'
    engine = make_engine(tiny_model_dir, tmp_path)
    assert engine.saved_capsules() == ['existing']  # the old version survived its overwrite
    info = engine.load('existing')
    assert info.num_tokens > 0
    hidden = [name for name in os.listdir(directory) if name.startswith('.')]
    versions = [name for name in hidden if name.startswith('.existing.v-')]
    assert hidden == versions and len(versions) <= 1, hidden  # no staging left behind
