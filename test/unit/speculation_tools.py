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
"""What the speculative-decoding tests share: prompts, a sampling setting, one generation run."""

from capsule_ros.runtime.config import SamplingConfig

FAMILIES = ['llama', 'lfm2', 'qwen3_5_text']
REPEATING = 'the red cup is on the table. the blue cup is on the shelf. ' * 3
SAMPLING = SamplingConfig(temperature=0.05, top_k=8, seed=11)


def run(engine, prompt, steps, sampling=None, **speculation):
    """Generate ``steps`` tokens after a raw ``prompt`` in a fresh session (closed after)."""
    session = engine.create_session(sampling=sampling, system_prompt=False)
    engine.append(session, prompt, role='raw')
    result = engine.generate(session, steps, reply=False, **speculation)
    state = (engine.session_tokens(session), engine.session_logits(session))
    engine.close_session(session)
    return result, state


def scripted_drafts(reference, position, count):
    """Plain greedy's next ``count`` tokens after ``position`` with every fifth one wrong."""
    drafts = reference[position:position + count]
    return [token + 1 if (position + index) % 5 == 3 else token
            for index, token in enumerate(drafts)]


def check_every_way_back(engine, session, label, check):
    """
    Check ``label``'s continuation every way back: ``check(session_id)`` after each.

    In place (the caller has just restored it into ``session``), into another session, as a
    branch, and through a file (save, release, load, restore).
    """
    check(session)
    other = engine.create_session(system_prompt=False)
    engine.restore(label, other)
    check(other)
    engine.close_session(other)
    child = engine.branch(label, 1)[0]
    check(child)
    engine.close_session(child)
    engine.save(label, f'{label}-file')
    engine.release(label)
    engine.load(f'{label}-file')
    engine.restore(f'{label}-file')
    check(session)
    engine.restore(f'{label}-file')
    engine.release(f'{label}-file')
