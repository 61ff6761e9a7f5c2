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
"""Shared fixtures of the runtime unit tests: a small random-weight model and engines on it."""

from capsule_ros.runtime.config import PolicyConfig
from capsule_ros.runtime.engine import PolicyEngine
from capsule_ros.runtime.testing import write_tiny_model
import pytest


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory):
    """Directory of a 2-layer GQA Llama checkpoint with the real tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp('tiny-llama'))


def make_engine(model_dir, tmp_path, dtype='float32', progress=None, **groups):
    """Build an engine on ``model_dir`` with capsules saved under ``tmp_path``."""
    values = {'model': {'path': str(model_dir), 'dtype': dtype},
              'engine': {'max_seq_len': 256, 'max_sessions': 4, 'prefill_chunk': 32},
              'capsules': {'dir': str(tmp_path / 'capsules')}}
    for group, overrides in groups.items():
        values.setdefault(group, {}).update(overrides)
    return PolicyEngine(PolicyConfig.from_dict(values), progress=progress)


@pytest.fixture
def tiny_engine(tiny_model_dir, tmp_path):
    """Return a fresh engine on the tiny model."""
    return make_engine(tiny_model_dir, tmp_path)
