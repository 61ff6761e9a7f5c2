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
The ``tensorrt`` backend: what runs without TensorRT here, and its GPU test (skipped here).

The bindings of a step, the state writes and the export are the ``onnxruntime`` backend's
(``test_onnxruntime_backend.py`` runs them); here: the module imports without TensorRT and
pycuda, choosing it names the missing packages, and the profile shapes, profile selection and
engine-cache key are what the Jetson build relies on.
"""

import importlib
import importlib.util

from capsule_ros.runtime.backends import tensorrt
from capsule_ros.runtime.config import MAX_DRAFT_TOKENS
from capsule_ros.runtime.errors import InvalidArgumentError
from conftest import make_engine
import pytest
import torch

HAS_TENSORRT = all(importlib.util.find_spec(name) is not None for name in ('tensorrt', 'pycuda'))


def test_the_module_imports_without_tensorrt_or_pycuda():
    module = importlib.reload(tensorrt)
    assert module.TensorRTModel.__name__ == 'TensorRTModel'


@pytest.mark.skipif(HAS_TENSORRT, reason='tensorrt and pycuda are installed here')
def test_choosing_tensorrt_without_it_names_the_missing_packages(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidArgumentError, match='backend.kind: tensorrt.*tensorrt, pycuda'):
        make_engine(tiny_model_dir, tmp_path, backend={'kind': 'tensorrt', 'device': 'cpu'})


def test_profiles_cover_decode_verify_and_prefill_chunks():
    decode, prefill = tensorrt.profile_shapes(prefill_chunk=512)
    verify = MAX_DRAFT_TOKENS + 1
    assert decode['input_ids'] == ((1, 1), (1, 1), (1, verify))
    assert prefill['input_ids'] == ((1, 1), (1, 512), (1, 512))
    assert decode['last_token_ids'][2] == prefill['last_token_ids'][2] == (1, verify)
    assert tensorrt.select_profile(1) == tensorrt.select_profile(verify) == 0
    assert tensorrt.select_profile(verify + 1) == tensorrt.select_profile(512) == 1


def test_the_engine_cache_key_covers_graph_version_gpu_and_profiles(tmp_path):
    graph = tmp_path / 'onnx-llama-abc' / 'step.onnx'
    profiles = tensorrt.profile_shapes(512)
    key = tensorrt.engine_cache_key(graph, '10.13.0', 'NVIDIA Thor', profiles)
    assert key == tensorrt.engine_cache_key(graph, '10.13.0', 'NVIDIA Thor', profiles)
    others = [tensorrt.engine_cache_key(tmp_path / 'onnx-llama-abd' / 'step.onnx', '10.13.0',
                                        'NVIDIA Thor', profiles),
              tensorrt.engine_cache_key(graph, '10.14.0', 'NVIDIA Thor', profiles),
              tensorrt.engine_cache_key(graph, '10.13.0', 'NVIDIA H100', profiles),
              tensorrt.engine_cache_key(graph, '10.13.0', 'NVIDIA Thor',
                                        tensorrt.profile_shapes(256))]
    assert len({key, *others}) == 5


@pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                    reason='needs TensorRT 10.x, pycuda and a CUDA GPU (a Jetson AGX Thor)')
def test_tensorrt_matches_torch_and_capsules_continue_exactly(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path / 'trt',
                         backend={'kind': 'tensorrt', 'device': 'cuda'})
    reference = make_engine(tiny_model_dir, tmp_path / 'torch')
    prompt = 'the red cup is on the table. the blue cup is on the shelf. ' * 3
    results = []
    for each in (engine, reference):
        session = each.create_session(system_prompt=False)
        each.append(session, prompt, role='raw')
        each.snapshot(session, 'start')
        first = each.generate(session, 32, reply=False).token_ids
        each.restore('start')
        assert each.generate(session, 32, reply=False).token_ids == first
        results.append(first)
    assert results[0] == results[1]
