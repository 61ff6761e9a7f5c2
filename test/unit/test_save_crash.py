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
Crash safety of save: SIGKILL at random instants while a process saves and overwrites.

A server process (this file run as a script) builds an engine on a small model with 3000-token
capsules, so one save (12 MB) takes about 0.1 s, and saves ``target`` once. For each round it
forks a saver that, back to back until it is killed, overwrites ``target`` with capsule ``a``
or ``b`` in turn and saves ``a`` under a new name ``new-<round>-<i>``. The test kills the saver
(SIGKILL) after a random delay spread over a few saves, then checks from its own engine: the
name that existed before loads complete and equal to one of the two versions (tokens, last
logits, continuation), every new name that exists loads equal to ``a``, the one being written
when the kill came does not exist (``UNKNOWN_CAPSULE``), and ``list`` shows exactly what
loads. No timing hook is used: the kills land wherever the delays put them, and the test
counts which leftovers (a half-written version, an unpublished one, a replaced one) they left.
At the end a new engine touching the directory sweeps every leftover.
"""

import fcntl
import json
import os
from pathlib import Path
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

from capsule_ros.runtime import persist
from capsule_ros.runtime.errors import UnknownCapsuleError
from capsule_ros.runtime.testing import write_tiny_model
from conftest import make_engine
from test_capsule_files import capsule_state, continue_from
import torch

HERE = Path(__file__).resolve().parent
NUM_ROUNDS = 24
NUM_TOKENS = 3000
MODEL = {'num_hidden_layers': 4, 'num_key_value_heads': 4, 'hidden_size': 128,
         'intermediate_size': 256, 'max_position_embeddings': 4096}
ENGINE = {'max_seq_len': 3072, 'prefill_chunk': 512}


# -- the server (runs in its own process) ---------------------------------------------------


def serve(model_dir: Path, root: Path) -> None:
    """Build capsules a and b, save the references, then fork one saver per round."""
    torch.set_num_threads(1)  # no thread pool to inherit across fork
    engine = make_engine(model_dir, root, engine=ENGINE)
    for label, seed in (('a', 1), ('b', 2)):
        session = engine.create_session(system_prompt=False)
        tokens = torch.randint(100, 40000, (NUM_TOKENS,),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        engine.append(session, tokens=tokens)
        engine.snapshot(session, label)
        engine.save(label, f'ref-{label}')
    engine.save('a', 'target')
    started = time.perf_counter()
    engine.save('b', 'target')
    save_s = time.perf_counter() - started
    reply({'ready': True, 'save_s': save_s})
    for line in sys.stdin:
        command = line.split()
        if command[0] != 'round':
            break
        child = os.fork()
        if child == 0:
            try:
                for index in range(10_000):
                    engine.save('ab'[index % 2], 'target')
                    engine.save('a', f'new-{command[1]}-{index}')
            except BaseException as error:
                sys.stderr.write(f'saver failed: {error!r}\n')
            finally:
                os._exit(1)  # only SIGKILL is a correct end
        reply({'pid': child})
        _, status = os.waitpid(child, 0)
        reply({'reaped': status})


def reply(message: dict) -> None:
    """One JSON line to the test."""
    sys.stdout.write(json.dumps(message) + '\n')
    sys.stdout.flush()


# -- the test -------------------------------------------------------------------------------


class Server:
    """The server process, spoken to by lines."""

    def __init__(self, model_dir: Path, root: Path):
        """Start it and wait until its references are saved."""
        self.process = subprocess.Popen(
            [sys.executable, __file__, 'serve', str(model_dir), str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))

    def read(self, timeout: float = 120.0) -> dict:
        """Next message (fails the test on silence)."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, 'the save server went silent'
        line = self.process.stdout.readline()
        assert line, f'the save server exited with {self.process.wait()}'
        return json.loads(line)

    def send(self, line: str) -> None:
        """One command line."""
        self.process.stdin.write(line + '\n')
        self.process.stdin.flush()

    def stop(self) -> None:
        """Let it exit; kill it if it does not."""
        try:
            self.send('quit')
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def reference(engine, capsule_id):
    """Return what a correct load of a version shows: journal, last logits, continuation."""
    _, tokens, logits = capsule_state(engine, capsule_id)
    return tokens, logits, continue_from(engine, capsule_id, steps=2)


def matches(got, expected) -> bool:
    """Bitwise equal references."""
    tokens, logits, (journal, continuation, last) = got
    return (tokens == expected[0] and torch.equal(logits, expected[1])
            and journal == expected[2][0] and continuation == expected[2][1]
            and torch.equal(last, expected[2][2]))


def load_as(engine, name, versions) -> str:
    """Load ``name``, return which of ``versions`` it equals (fails if none), release it."""
    engine.load(name)
    try:
        got = reference(engine, name)
    finally:
        engine.release(name)
    equal = [label for label, expected in versions.items() if matches(got, expected)]
    assert equal, f'{name} loaded but equals no saved version'
    return equal[0]


def leftovers(directory: Path) -> list[str]:
    """Hidden entries that are not the current version of a name."""
    current = {os.readlink(directory / name) for name in os.listdir(directory)
               if (directory / name).is_symlink() and not name.startswith('.')}
    return sorted(name for name in os.listdir(directory)
                  if name.startswith('.') and name not in current)


def kind_of_leftover(directory: Path, name: str) -> str:
    """Which phase of a save a leftover entry shows the kill hit."""
    path = directory / name
    if '.link-' in name:
        return 'link not yet renamed'
    if not path.is_dir():
        return 'other'
    files = set(os.listdir(path))
    if 'manifest.json' not in files:
        return 'payload being written'
    if any(os.readlink(directory / entry) == name for entry in os.listdir(directory)
           if (directory / entry).is_symlink()):
        return 'published'
    return 'complete, unpublished or replaced'


def test_kills_during_save_never_lose_or_mix_a_capsule(tmp_path):
    """SIGKILL at >= 20 random points of save and overwrite-save; sweep at start-up."""
    model_dir = write_tiny_model(tmp_path / 'model', overrides=MODEL)
    directory = tmp_path / 'capsules'
    server = Server(model_dir, tmp_path)
    try:
        ready = server.read()
        engine = make_engine(model_dir, tmp_path, engine=ENGINE)
        versions = {}
        for label in ('a', 'b'):
            engine.load(f'ref-{label}')
            versions[label] = reference(engine, f'ref-{label}')
            engine.release(f'ref-{label}')
        assert not matches(versions['a'], versions['b'])
        rng = random.Random(20260)
        seen = {}
        known = set()  # leftovers already counted, and versions of names the test removed
        swept = 0  # leftovers that the next saver's sweep removed (a new process's first save)
        for round_index in range(NUM_ROUNDS):
            server.send(f'round {round_index}')
            pid = server.read()['pid']
            time.sleep(rng.uniform(0.0, 3.0 * ready['save_s']))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended by itself: the status below says how
            status = server.read()['reaped']
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            gone = {name for name in known if not os.path.lexists(directory / name)}
            swept += len(gone)
            known -= gone
            for name in leftovers(directory):
                if name not in known:
                    kind = kind_of_leftover(directory, name)
                    seen[kind] = seen.get(kind, 0) + 1
                    known.add(name)
            # the name that existed before: never lost, never a mix
            assert load_as(engine, 'target', versions) in ('a', 'b')
            # new names: complete where they exist; the interrupted one does not exist
            index = 0
            while os.path.lexists(directory / f'new-{round_index}-{index}'):
                name = f'new-{round_index}-{index}'
                assert load_as(engine, name, versions) == 'a'
                if (directory / name).is_symlink():
                    known.add(os.readlink(directory / name))
                    os.unlink(directory / name)  # its version is left for the sweep below
                else:
                    shutil.rmtree(directory / name)
                index += 1
            try:
                engine.load(f'new-{round_index}-{index}')
                raise AssertionError('a capsule that was never saved loaded')
            except UnknownCapsuleError:
                pass
            assert persist.list_saved(directory) == ['ref-a', 'ref-b', 'target']
    finally:
        server.stop()
    print(f'leftovers seen after {NUM_ROUNDS} kills (save takes {ready["save_s"]:.3f} s): '
          f'{seen}')
    assert seen, 'no kill landed inside a save'
    # start-up sweep: a new engine touching the directory leaves only current versions
    swept += len(leftovers(directory))
    fresh = make_engine(model_dir, tmp_path, engine=ENGINE)
    assert fresh.saved_capsules() == ['ref-a', 'ref-b', 'target']
    assert leftovers(directory) == []
    assert swept >= sum(seen.values())  # nothing a kill left survived a later sweep
    assert load_as(fresh, 'target', versions) in ('a', 'b')


def test_sweep_takes_what_crashed_saves_left_and_spares_live_writers(tiny_model_dir, tmp_path):
    """Every kind of leftover goes; a version a live writer holds (its flock) and its link stay."""
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'Something worth saving.')
    engine.snapshot(session, 'kept')
    engine.save('kept')
    directory = engine.config.capsules.directory()
    current = os.readlink(directory / 'kept')
    crashed = {
        '.kept.v-' + '1' * 32: 'dir',       # killed while writing the payload
        '.other.v-' + '2' * 32: 'dir',      # complete, its name never pointed at it
        '.kept.link-' + '3' * 32: '.kept.v-' + '9' * 32,  # killed before the rename
        '.kept.link-' + '4' * 32: 'dir',    # a replaced real directory, not yet removed
        '.kept.tmp-123-abcdef01': 'dir',    # format 1 staging
        '.kept.old-abcdef01': 'dir',        # format 1 retired
    }
    for name, kind in crashed.items():
        if kind == 'dir':
            (directory / name).mkdir()
            (directory / name / 'payload.safetensors').write_bytes(b'partial')
        else:
            os.symlink(kind, directory / name)
    live = '.kept.v-' + '5' * 32
    (directory / live).mkdir()
    os.symlink(live, directory / ('.kept.link-' + '6' * 32))
    (directory / '.operator-notes').write_text('not ours: never touched')
    lock = os.open(directory / live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the writer of that version holds it
        assert engine.saved_capsules() == ['kept']
        remaining = set(os.listdir(directory))
        assert not remaining & set(crashed)
        assert {current, live, '.kept.link-' + '6' * 32, '.operator-notes'} <= remaining
    finally:
        os.close(lock)  # the writer died
    engine.saved_capsules()
    assert sorted(os.listdir(directory)) == sorted([current, 'kept', '.operator-notes'])
    engine.release('kept')
    assert engine.load('kept').num_tokens > 0


def test_a_copied_directory_loads_and_save_replaces_it_atomically(tiny_model_dir, tmp_path):
    """A name that is a real directory (copied from another robot) loads; save swaps it."""
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'Copied between robots.')
    engine.snapshot(session, 'first')
    engine.append(session, 'And then some more.')
    engine.snapshot(session, 'second')
    engine.save('first', 'shared')
    directory = engine.config.capsules.directory()
    version = directory / os.readlink(directory / 'shared')
    os.unlink(directory / 'shared')
    shutil.copytree(version, directory / 'shared')  # what cp -r of the files gives
    shutil.rmtree(version)
    assert engine.saved_capsules() == ['shared']
    assert engine.load('shared').num_tokens == engine.capsule('first').position
    engine.release('shared')
    engine.save('second', 'shared')
    assert (directory / 'shared').is_symlink()
    assert engine.load('shared').num_tokens == engine.capsule('second').position
    assert sorted(os.listdir(directory)) == sorted(['shared', os.readlink(directory / 'shared')])


def test_saves_lists_and_loads_at_once_never_fail(tiny_model_dir, tmp_path):
    """Threads saving, listing (which sweeps) and reading one name for 3 s: no error, no gap."""
    engine = make_engine(tiny_model_dir, tmp_path)
    session = engine.create_session(system_prompt=False)
    engine.append(session, 'Saved over and over. ' * 10)
    engine.snapshot(session, 'busy')
    engine.save('busy', 'name')
    directory = engine.config.capsules.directory()
    errors = []
    stop = time.monotonic() + 3.0

    def repeat(action):
        def run():
            while time.monotonic() < stop:
                try:
                    action()
                except Exception as error:  # any failure at all is the finding
                    errors.append(repr(error))
        return threading.Thread(target=run)

    def listed():
        assert engine.saved_capsules() == ['name']

    def read():
        persist.read_capsule(directory, 'name', engine.layout, engine.fingerprint,
                             engine.max_seq_len, engine.model_config.vocab_size)

    def save():
        engine.save('busy', 'name')

    threads = [repeat(save), repeat(save), repeat(listed), repeat(read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine.saved_capsules()
    assert sorted(os.listdir(directory)) == sorted(['name', os.readlink(directory / 'name')])


if __name__ == '__main__':
    if sys.argv[1] == 'serve':
        serve(Path(sys.argv[2]), Path(sys.argv[3]))
