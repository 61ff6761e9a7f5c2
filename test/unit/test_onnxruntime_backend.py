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
The ``onnxruntime`` backend on random-weight Llama and LFM2 models.

The exported graph's contract, parity with the torch backend, state bound by address with only
the new positions written, the export cache, capsules on it (property-based programs) and the
refusals that name what to change.
"""

from pathlib import Path

from capsule_ros.runtime import export
from capsule_ros.runtime.errors import CapsuleRosError, InvalidArgumentError
from capsule_ros.runtime.testing import (run_capsule_programs, write_random_mtp_head,
                                         write_tiny_model)
from conftest import make_engine
import pytest
from speculation_tools import REPEATING, run
import torch

pytest.importorskip('onnxruntime', reason='the onnxruntime backend needs onnxruntime')
ORT = {'kind': 'onnxruntime'}


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('model-cache')


@pytest.fixture(scope='module', params=['llama', 'lfm2'])
def model_dir(request, tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp(f'tiny-{request.param}'),
                            family=request.param)


@pytest.fixture(scope='module')
def engines(model_dir, cache_dir, tmp_path_factory):
    """Build an engine per backend on the same checkpoint (fp32)."""
    progress = []
    ort = make_engine(model_dir, tmp_path_factory.mktemp('ort'), backend=ORT,
                      model={'cache_dir': str(cache_dir)}, progress=progress.append)
    torch_engine = make_engine(model_dir, tmp_path_factory.mktemp('torch'))
    return ort, torch_engine, progress


def test_the_graph_has_the_contract_names_shapes_and_dtypes(engines, cache_dir):
    import onnx
    ort, _, progress = engines
    assert any(f'exporting the {ort.model.family} step graph' in line for line in progress)
    proto = onnx.load(str(ort.model.path), load_external_data=False)
    graph = {value.name: value for value in list(proto.graph.input) + list(proto.graph.output)}
    expected = export.contract(ort.layout, ort.model_config.vocab_size)
    assert [value.name for value in proto.graph.input] == [
        binding.name for binding in expected if binding.is_input]
    assert [value.name for value in proto.graph.output] == [
        binding.name for binding in expected if not binding.is_input]
    element_types = {torch.int64: onnx.TensorProto.INT64, torch.float32: onnx.TensorProto.FLOAT}
    for binding in expected:
        tensor_type = graph[binding.name].type.tensor_type
        shape = tuple(dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim)
        assert shape == binding.shape, binding.name
        assert tensor_type.elem_type == element_types[binding.dtype], binding.name
    num_layers, _, num_kv_heads, max_seq_len, head_dim = ort.layout.by_name['kv'].shape
    assert graph['past_key_values_0'].type.tensor_type.shape.dim[3].dim_value == max_seq_len
    assert f'past_key_values_{num_layers - 1}' in graph
    assert f'present_key_values_{num_layers}' not in graph
    if 'conv' in ort.layout.by_name:  # LFM2: every conv layer's state in and out, whole
        num_conv, hidden_size, kernel_size = ort.layout.by_name['conv'].shape
        for name in (f'conv_state_{num_conv - 1}', f'present_conv_state_{num_conv - 1}'):
            shape = tuple(dim.dim_value for dim in graph[name].type.tensor_type.shape.dim)
            assert shape == (1, hidden_size, kernel_size)
        assert f'conv_state_{num_conv}' not in graph


def test_onnxruntime_matches_torch_greedy_and_speculative(engines):
    ort, torch_engine, _ = engines
    for speculation in ({'speculative': 'off'}, {'speculative': 'lookup',
                                                 'num_draft_tokens': 4}):
        got, (journal, logits) = run(ort, REPEATING, 48, **speculation)
        expected, (expected_journal, expected_logits) = run(torch_engine, REPEATING, 48,
                                                            **speculation)
        assert got.token_ids == expected.token_ids
        assert journal == expected_journal
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)
        assert got.drafted_tokens == expected.drafted_tokens


def test_a_step_reads_the_slot_by_address_and_writes_only_the_new_positions(engines):
    ort, torch_engine, _ = engines
    ids = torch.tensor(ort.tokenize(REPEATING)[:20])
    state = ort.layout.allocate(torch.device('cpu'))
    reference = torch_engine.layout.allocate(torch.device('cpu'))
    torch_engine.model.forward(ids, 0, reference)
    ort.model.forward(ids[:12], 0, state)
    state['kv'][:, :, :, 20:] = 7.0  # stale positions past the step: must stay untouched
    out_state = dict(state)
    if 'conv' in state:  # copy-on-write: the new conv state goes to a fresh target
        before = state['conv'].clone()
        out_state['conv'] = torch.full_like(state['conv'], float('nan'))
    logits = ort.model.forward(ids[12:], 12, state, all_logits=True,
                               out_state=out_state)  # [8, V]
    assert logits.shape == (8, ort.model_config.vocab_size)
    torch.testing.assert_close(state['kv'][:, :, :, :20], reference['kv'][:, :, :, :20],
                               rtol=0, atol=1e-5)
    assert bool((state['kv'][:, :, :, 20:] == 7.0).all())
    if 'conv' in state:
        assert torch.equal(state['conv'], before)  # the input state is left as it was
        torch.testing.assert_close(out_state['conv'], reference['conv'], rtol=0, atol=1e-5)
        state['conv'] = out_state['conv']
    one = ort.model.forward(ids[:1], 20, state)  # a decode step: logits [V]
    assert one.shape == (ort.model_config.vocab_size,)


def test_the_export_is_cached_by_weights_layout_and_length(engines, model_dir, cache_dir,
                                                           tmp_path):
    ort, _, _ = engines
    progress = []
    again = make_engine(model_dir, tmp_path / 'again', backend=ORT,
                        model={'cache_dir': str(cache_dir)}, progress=progress.append)
    assert again.model.path == ort.model.path
    assert not any('exporting' in line for line in progress)
    before = set(Path(cache_dir, 'onnx').iterdir())
    longer = make_engine(model_dir, tmp_path / 'longer', backend=ORT,
                         model={'cache_dir': str(cache_dir)}, engine={'max_seq_len': 128})
    assert longer.model.path != ort.model.path  # T is part of the graph
    assert set(Path(cache_dir, 'onnx').iterdir()) - before == {longer.model.path.parent}


def test_capsules_on_onnxruntime_follow_the_replay(engines):
    """Random capsule programs (snapshot, restore, branch, save / load, swaps) on ORT."""
    ort, _, _ = engines
    run_capsule_programs(ort, max_examples=10, steps=20, speculative='lookup')


def test_a_torch_capsule_is_refused_on_onnxruntime(engines, model_dir):
    ort, torch_engine, _ = engines
    assert ort.fingerprint != torch_engine.fingerprint  # the fingerprint names the backend
    # a torch engine saving into the ORT engine's capsule directory
    neighbour = make_engine(model_dir, ort.config.capsules.directory().parent)
    session = neighbour.create_session(system_prompt=False)
    neighbour.append(session, REPEATING, role='raw')
    neighbour.snapshot(session, 'from-torch')
    neighbour.save('from-torch')
    with pytest.raises(CapsuleRosError, match='fingerprint') as raised:
        ort.load('from-torch')
    assert raised.value.code == 'FINGERPRINT_MISMATCH'


def test_what_the_compiled_path_does_not_run_is_refused_by_parameter(tiny_model_dir, tmp_path,
                                                                     cache_dir):
    with pytest.raises(InvalidArgumentError, match='parameter model.dtype: .*float32'):
        make_engine(tiny_model_dir, tmp_path / 'a', dtype='bfloat16', backend=ORT)
    qwen = write_tiny_model(tmp_path / 'qwen', family='qwen3_5_text')
    with pytest.raises(InvalidArgumentError, match='parameter backend.kind: .*qwen3_5'):
        make_engine(qwen, tmp_path / 'b', backend=ORT, model={'cache_dir': str(cache_dir)})
    with_head = write_random_mtp_head(write_tiny_model(tmp_path / 'mtp'))
    with pytest.raises(InvalidArgumentError, match='parameter generation.speculative: mtp'):
        make_engine(with_head, tmp_path / 'c', backend=ORT, generation={'speculative': 'mtp'},
                    model={'cache_dir': str(cache_dir)})
    with pytest.raises(InvalidArgumentError, match='parameter model.quantization: int4'):
        make_engine(tiny_model_dir, tmp_path / 'd', backend=ORT,
                    model={'quantization': 'int4'})
