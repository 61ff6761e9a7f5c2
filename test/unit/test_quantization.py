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
"""4-bit decode weights: GGUF Q4_1 found again exactly, off-grid weights left dense."""

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.loader import load_hf_directory
from capsule_ros.runtime.models.llama import LlamaConfig, LlamaModel
from capsule_ros.runtime.quantization import int4_linear, quantize_int4
from capsule_ros.runtime.testing import write_tiny_model
from gguf.quants import dequantize, GGMLQuantizationType, quantize
import numpy
import pytest
import torch


def q4_1_weight(rows, columns, seed):
    """Return a weight as the GGUF would carry it: Q4_1-quantized by gguf, dequantized."""
    generator = numpy.random.default_rng(seed)
    weight = generator.standard_normal((rows, columns)).astype(numpy.float32) * 0.05
    blocks = quantize(weight, GGMLQuantizationType.Q4_1)
    return torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1).copy())


def test_q4_1_weights_are_found_again_exactly():
    """Min/max groups of 32 recover gguf's Q4_1 blocks: fp32 scales reproduce every weight."""
    weight = q4_1_weight(96, 256, seed=0)
    quantized = quantize_int4(weight, torch.float32)
    assert quantized.on_grid
    assert torch.allclose(quantized.dequantized, weight, rtol=0, atol=1e-6)


def test_bf16_scales_stay_within_bf16_rounding_of_the_q4_1_weights():
    """With bf16 scales the grid moves by at most bf16 rounding of scale and zero."""
    weight = q4_1_weight(64, 128, seed=1)
    quantized = quantize_int4(weight, torch.bfloat16)
    assert quantized.on_grid
    scale, zero = quantized.weight.scales_and_zeros.float().unbind(-1)  # [K / 32, N] each
    # (q - 8) * s' + z' with z' = bf16(min + 8 s') differs from q * s + min by q (s' - s) plus
    # the rounding of z': two bf16 roundings (2^-8 relative each), q <= 15
    bound = (15 * scale.abs() + zero.abs()) * 2.0 ** -8
    error = (quantized.dequantized - weight).abs().reshape(64, 4, 32).amax(-1).T  # [K/32, N]
    assert bool((error <= bound + 1e-7).all())


def test_random_weights_are_not_on_a_grid():
    """Weights that were never 4-bit are detected as such (auto leaves them dense)."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    assert not quantize_int4(weight, torch.bfloat16).on_grid
    assert quantize_int4(weight, torch.bfloat16, only_on_grid=True) is None


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_int4_linear_multiplies_the_dense_expansion(dtype):
    """The int4 kernel computes x @ W.T with W = (q - 8) * scale + zero."""
    weight = q4_1_weight(96, 256, seed=3)
    quantized = quantize_int4(weight, dtype)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected = x.float() @ quantized.dequantized.T
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(int4_linear(x, quantized.weight).float(), expected, rtol=0,
                          atol=tolerance * float(expected.abs().max()))


def tiny_model(tmp_path, dtype, quantization):
    """Return the tiny random-weight Llama with the given decode weights."""
    directory = write_tiny_model(tmp_path / 'tiny')
    hf_config, weights = load_hf_directory(directory)
    return LlamaModel(LlamaConfig.from_hf(hf_config), weights, dtype, torch.device('cpu'), 256,
                      quantization)


def test_auto_keeps_off_grid_weights_dense_and_int4_forces(tmp_path):
    """Mode auto quantizes on-grid weights only, int4 all of them; the format says which."""
    auto = tiny_model(tmp_path, torch.bfloat16, 'auto')
    forced = tiny_model(tmp_path, torch.bfloat16, 'int4')
    none = tiny_model(tmp_path, torch.bfloat16, 'none')
    assert auto.int4_linears == 0 and none.int4_linears == 0
    assert forced.int4_linears == 4 * forced.config.num_layers
    # the fingerprinted format is what decode runs on: auto found nothing, so it is dense
    assert auto.weights_format == none.weights_format != forced.weights_format
    assert tiny_model(tmp_path, torch.float32, 'auto').linears.quantization == 'none'


def test_int4_decode_equals_prefill_of_the_same_weights(tmp_path):
    """Decode streams int4, prefill multiplies its expansion: fp32 logits agree to 1e-4."""
    model = tiny_model(tmp_path, torch.float32, 'int4')
    tokens = torch.randint(0, model.config.vocab_size, (40,),
                           generator=torch.Generator().manual_seed(5))
    prefill_kv = torch.zeros(model.state_specs()[0].shape)
    decode_kv = torch.zeros(model.state_specs()[0].shape)
    one_shot = model.forward(tokens, 0, {'kv': prefill_kv}, all_logits=True)  # [40, V]
    for position, token in enumerate(tokens.tolist()):
        stepped = model.forward(torch.tensor([token]), position, {'kv': decode_kv})  # [V]
        assert float((stepped - one_shot[position]).abs().max()) <= 1e-4, position
    assert float((decode_kv - prefill_kv).abs().max()) <= 1e-4


def test_int4_on_cuda_is_refused_with_the_parameter_name(tmp_path):
    """Forcing int4 where its kernel does not run names the parameter to change."""
    directory = write_tiny_model(tmp_path / 'tiny')
    hf_config, weights = load_hf_directory(directory)
    with pytest.raises(InvalidArgumentError, match='model.quantization'):
        LlamaModel(LlamaConfig.from_hf(hf_config), weights, torch.float32,
                   torch.device('cuda'), 64, 'int4')
