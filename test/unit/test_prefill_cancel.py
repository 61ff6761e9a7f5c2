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
"""A cancel stops a prefill between chunks, at a clean boundary (tiny model, 32-token chunks)."""

import threading

from capsule_ros.runtime.errors import PrefillCanceledError
import pytest
import torch

CHUNK = 32  # the tiny engine's engine.prefill_chunk (test/unit/conftest.py)


def test_cancel_stops_the_prefill_after_the_current_chunk(tiny_engine):
    engine = tiny_engine
    session = engine.create_session(system_prompt=False)
    tokens = list(range(10, 10 + 3 * CHUNK + 5))
    cancel = threading.Event()

    def progress(done, total):
        if done == CHUNK:
            cancel.set()  # during the first chunk's bookkeeping: the second never starts

    with pytest.raises(PrefillCanceledError) as raised:
        engine.append(session, tokens=tokens, progress=progress, cancel=cancel)
    assert (raised.value.num_tokens, raised.value.total_tokens) == (CHUNK, len(tokens))
    assert engine.session_position(session) == CHUNK
    assert engine.session_tokens(session) == tokens[:CHUNK]

    # The boundary is clean: continuing from it equals the uninterrupted prefill.
    engine.append(session, tokens=tokens[CHUNK:])
    resumed = engine.session_logits(session)
    other = engine.create_session(system_prompt=False)
    engine.append(other, tokens=tokens)
    assert engine.session_tokens(other) == engine.session_tokens(session)
    assert torch.equal(resumed, engine.session_logits(other))  # the same chunks, computed alike


def test_a_set_cancel_prefills_nothing(tiny_engine):
    engine = tiny_engine
    session = engine.create_session(system_prompt=False)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PrefillCanceledError) as raised:
        engine.append(session, 'Where is the red cup?', cancel=cancel)
    assert raised.value.num_tokens == 0
    assert engine.session_position(session) == 0
    engine.append(session, 'Where is the red cup?')  # the session is still usable
    assert engine.session_position(session) > 0
