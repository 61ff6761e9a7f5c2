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
"""A few random capsule programs on the real SmolLM2 weights, checked against replays."""

from capsule_ros.runtime.testing import run_capsule_programs
from conftest import make_engine


def test_random_capsule_programs_on_real_weights(tmp_path):
    """A handful of programs: the machine's checks hold with the real model too."""
    engine = make_engine(tmp_path, engine={'max_seq_len': 320, 'max_sessions': 5},
                         capsules={'budget_bytes': 64 << 20})
    run_capsule_programs(engine, max_examples=4, steps=10)
