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
"""CUDA path of the torch backend (runs only where a CUDA GPU is present)."""

from conftest import make_engine
import pytest
import torch

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='needs a CUDA GPU with a CUDA build of torch (torch.cuda.is_available() is False); '
           'the same engine code is tested on the CPU in this tier')


@needs_cuda
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cuda_engine_matches_cpu_and_restores_bitwise(tiny_model_dir, tmp_path, dtype):
    cpu = make_engine(tiny_model_dir, tmp_path / 'cpu', dtype=dtype)
    cuda = make_engine(tiny_model_dir, tmp_path / 'cuda', dtype=dtype,
                       backend={'device': 'cuda'})
    tokens = {}
    for name, engine in (('cpu', cpu), ('cuda', cuda)):
        session = engine.create_session()
        engine.append(session, 'Drive to the charging dock.')
        engine.snapshot(session, 'dock')
        tokens[name] = engine.generate(session, 8).token_ids
        logits = engine.session_logits(session)
        engine.restore('dock', engine.create_session())
        other = engine.sessions()[-1]
        assert engine.generate(other, 8).token_ids == tokens[name]
        assert torch.equal(engine.session_logits(other), logits)
    assert tokens['cpu'] == tokens['cuda']
