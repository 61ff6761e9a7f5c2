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
"""Configuration validation, the state layout, and what a capsule captures."""

from capsule_ros.runtime.config import PolicyConfig, SamplingConfig
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.state import StateKind
import pytest


@pytest.mark.parametrize('values, parameter', [
    ({'engine': {'max_seq_len': 'long'}}, 'engine.max_seq_len'),
    ({'engine': {'max_seq_len': 4}}, 'engine.max_seq_len'),
    ({'engine': {'max_sessions': 0}}, 'engine.max_sessions'),
    ({'engine': {'max_sesions': 2}}, 'engine.max_sesions'),
    ({'model': {'dtype': 'int3'}}, 'model.dtype'),
    ({'backend': {'kind': 'magic'}}, 'backend.kind'),
    ({'capsules': {'budget_bytes': -1}}, 'capsules.budget_bytes'),
    ({'generation': {'top_p': 0.0}}, 'generation.top_p'),
    ({'generation': {'temperature': float('nan')}}, 'generation.temperature'),
    ({'planner': {}}, 'planner'),
])
def test_invalid_parameters_name_the_parameter(values, parameter):
    with pytest.raises(InvalidArgumentError, match=parameter.replace('.', r'\.')):
        PolicyConfig.from_dict(values)


def test_integers_are_accepted_for_floats_and_configs_are_frozen():
    config = PolicyConfig.from_dict({'generation': {'temperature': 1}})
    assert config.generation.temperature == 1.0
    with pytest.raises(AttributeError):
        config.engine.max_seq_len = 5


@pytest.mark.parametrize('kwargs', [{'temperature': -0.1}, {'top_k': -1}, {'top_p': 1.5},
                                    {'seed': -2}, {'temperature': float('inf')}])
def test_bad_sampling_values_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        SamplingConfig(**kwargs)


def test_a_capsule_captures_exactly_the_layout(tiny_engine):
    engine = tiny_engine
    layout = engine.layout
    kinds = {spec.name: spec.kind for spec in layout.specs}
    assert kinds['kv'] is StateKind.KV
    assert {'tokens', 'last_logits', 'rng_state', 'scalars'} <= set(kinds)
    session = engine.create_session()
    engine.append(session, 'hello there')
    engine.snapshot(session, 'probe')
    capsule = engine.capsule('probe')
    assert set(capsule.fixed) == {spec.name for spec in layout.fixed_specs}
    covered = [(segment.start, segment.end) for segment in capsule.chain]
    assert covered[0][0] == 0 and covered[-1][1] == capsule.position
    for segment in capsule.chain:
        assert set(segment.read(layout)) == {spec.name for spec in layout.sequence_specs}
    assert capsule.fingerprint == engine.fingerprint
    assert layout.slot_bytes() == sum(
        tensor.numel() * tensor.element_size()
        for tensor in engine._sessions[session].slot.buffers.values())
