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

The state machine (``capsule_ros.runtime.testing.capsule_program_machine``) checks every
touched session against a replay of its operations in a fresh session (journal equal, last
logits bitwise equal), the byte budget after every step, and that evictions spare pins.
"""

from capsule_ros.runtime.testing import run_capsule_programs
from conftest import make_engine
import pytest


@pytest.mark.parametrize('budget_bytes', [700_000, 64 << 20])
def test_random_capsule_programs_match_replay(tiny_model_dir, tmp_path, budget_bytes):
    """Hundreds of random programs, with a tight budget (evictions) and a roomy one."""
    engine = make_engine(tiny_model_dir, tmp_path, capsules={'budget_bytes': budget_bytes})
    run_capsule_programs(engine, max_examples=200, steps=30)


def test_random_programs_with_more_sessions_than_slots(tiny_model_dir, tmp_path):
    """Four open sessions and the replay on two slots: sessions swap out and in all the time."""
    engine = make_engine(tiny_model_dir, tmp_path, engine={'max_sessions': 2},
                         capsules={'budget_bytes': 64 << 20})
    run_capsule_programs(engine, max_examples=60, steps=30, max_open=4)
