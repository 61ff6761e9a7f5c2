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
Parity of the Qwen3.5 model file with transformers 5.24 on a tiny random-weight checkpoint.

The checkpoint (``TINY_QWEN3_5``) has Gated DeltaNet layers 0-2 and gated attention in layer 3;
its weights are N(0, 0.2), so activations are large and fp32 rounding differences grow through
the layers: tolerances are relative to the largest reference value where that is what matters.
"""

import json

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.loader import load_hf_directory
from capsule_ros.runtime.models.qwen3_5 import Qwen35Config, Qwen35Model, rope_tables
from capsule_ros.runtime.state import StateLayout
from capsule_ros.runtime.testing import write_tiny_model
import pytest
import torch

CPU = torch.device('cpu')
MAX_SEQ_LEN = 512
# fp32 against transformers (measured: logits 1.3e-4 abs on |logits| <= 10; conv 4e-6,
# recurrent 3e-6, kv 1e-5 relative)
LOGITS_ATOL = 1e-3
STATE_RTOL = 5e-5
# chunked prefill against token-by-token decode, fp32 (measured: states 3e-5 relative at
# worst, typically 1e-6; logits 8e-5 abs)
STEPWISE_STATE_RTOL = 2e-4
STEPWISE_LOGITS_ATOL = 1e-3
# bf16 against fp32, as RMS of the difference over RMS of fp32 (measured over 6 prompts:
# logits 0.03-0.05, states 0.01-0.05; 89-97% same argmax)
BF16_RMS_RTOL = 0.1
BF16_MIN_ARGMAX_AGREEMENT = 0.8
# bf16 against transformers in bf16, RMS-relative (measured: bitwise equal on this CPU; an
# fp32-level change such as chunk 16 instead of 64 moves it by 0.002-0.004, other GEMM kernels
# may too; the whole bf16-vs-fp32 gap is 0.03-0.05)
BF16_REFERENCE_RMS_RTOL = 0.02

# Qwen/Qwen3.5-0.8B's text_config as published (cross-checked against public copies of its
# config.json, not read from the hub here); the RoPE test uses its rope parameters
QWEN3_5_0_8B_TEXT = {
    'model_type': 'qwen3_5_text', 'vocab_size': 248320, 'hidden_size': 1024,
    'intermediate_size': 3584, 'num_hidden_layers': 24, 'num_attention_heads': 8,
    'num_key_value_heads': 2, 'head_dim': 256, 'hidden_act': 'silu', 'attention_bias': False,
    'attn_output_gate': True, 'rms_norm_eps': 1e-6, 'max_position_embeddings': 262144,
    'tie_word_embeddings': True, 'full_attention_interval': 4, 'linear_conv_kernel_dim': 4,
    'linear_key_head_dim': 128, 'linear_value_head_dim': 128, 'linear_num_key_heads': 16,
    'linear_num_value_heads': 16, 'mamba_ssm_dtype': 'float32', 'mtp_num_hidden_layers': 1,
    'mtp_use_dedicated_embeddings': False,
    'layer_types': ['full_attention' if index % 4 == 3 else 'linear_attention'
                    for index in range(24)],
    'rope_parameters': {'mrope_interleaved': True, 'mrope_section': [11, 11, 10],
                        'rope_type': 'default', 'rope_theta': 10000000,
                        'partial_rotary_factor': 0.25},
}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """Write the tiny Qwen3.5 checkpoint; return its directory, config and weights."""
    directory = write_tiny_model(tmp_path_factory.mktemp('qwen3_5') / 'x', family='qwen3_5_text')
    hf_config, weights = load_hf_directory(directory)
    return directory, hf_config, weights


@pytest.fixture(scope='module')
def reference(checkpoint):
    """Load transformers' ``Qwen3_5ForCausalLM`` on the checkpoint, fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


def make_model(checkpoint, dtype=torch.float32):
    """Build our model on the checkpoint."""
    _, hf_config, weights = checkpoint
    return Qwen35Model(Qwen35Config.from_hf(hf_config), weights, dtype, CPU, MAX_SEQ_LEN)


def allocate(model):
    """Allocate the zeroed state buffers of one slot."""
    return StateLayout(model.state_specs()).allocate(CPU)


def random_tokens(model, count, seed):
    """Draw ``count`` random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (count,), generator=generator)


def relative(ours, theirs):
    """Return the largest absolute difference over the largest absolute reference value."""
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())


def rms_relative(ours, theirs):
    """Return the norm of the difference over the norm of the reference."""
    return float((ours.float() - theirs.float()).norm() / theirs.float().norm())


def reference_state(cache, config):
    """Return the reference cache as our buffers: conv [L_lin, C, K], recurrent, kv."""
    linear = [i for i, kind in enumerate(config.layer_types) if kind == 'linear_attention']
    full = [i for i, kind in enumerate(config.layer_types) if kind == 'full_attention']
    return {
        'conv': torch.stack([cache.layers[i].conv_states[0][0] for i in linear]),
        'recurrent': torch.stack([cache.layers[i].recurrent_states[0][0] for i in linear]),
        'kv': torch.stack([torch.stack((cache.layers[i].keys[0], cache.layers[i].values[0]))
                           for i in full]),
    }


def assert_state_close(state, cache, config, position):
    """Check our conv, recurrent and kv[:position] against the reference cache."""
    expected = reference_state(cache, config)
    assert expected['kv'].shape[3] == position
    for name in ('conv', 'recurrent'):
        assert state[name].shape == expected[name].shape
        assert relative(state[name], expected[name]) <= STATE_RTOL, name
    assert relative(state['kv'][:, :, :, :position], expected['kv']) <= STATE_RTOL


def greedy_decode(model, reference, state, cache, sequence, logits, steps):
    """Decode ``steps`` greedy tokens with both; check tokens and logits; return the cache."""
    for _ in range(steps):
        token = int(logits.argmax())
        sequence.append(token)
        logits = model.forward(torch.tensor([token]), len(sequence) - 1, state)
        output = reference(torch.tensor([[token]]), cache=cache, use_cache=True)
        cache = output.cache
        theirs = output.logits[0, -1]
        assert int(theirs.argmax()) == int(logits.argmax())
        assert float((logits - theirs).abs().max()) <= LOGITS_ATOL
    return cache


@torch.inference_mode()
def test_prefill_in_chunks_and_greedy_decode_match_transformers(checkpoint, reference):
    """210 tokens in 3 calls of 70 (chunk-64 edges inside), then 32 greedy steps."""
    model = make_model(checkpoint)
    state = allocate(model)
    tokens = random_tokens(model, 210, seed=0)
    ours = torch.cat([model.forward(tokens[start:start + 70], start, state, all_logits=True)
                      for start in (0, 70, 140)])
    output = reference(tokens[None], use_cache=True)
    assert float((ours - output.logits[0]).abs().max()) <= LOGITS_ATOL
    greedy_decode(model, reference, state, output.cache, tokens.tolist(), ours[-1], steps=32)


@torch.inference_mode()
def test_state_buffers_match_the_transformers_cache(checkpoint, reference):
    """Conv tails, recurrent states and KV equal the reference cache after prefill and decode."""
    model = make_model(checkpoint)
    state = allocate(model)
    specs = {spec.name: spec for spec in model.state_specs()}
    assert specs['conv'].shape == (3, model.config.conv_dim, 4)  # the last K inputs, not K - 1
    assert specs['recurrent'].dtype == torch.float32
    tokens = random_tokens(model, 150, seed=1)
    ours = torch.cat([model.forward(tokens[start:start + 75], start, state, all_logits=True)
                      for start in (0, 75)])
    output = reference(tokens[None], use_cache=True)
    assert_state_close(state, output.cache, model.config, 150)
    cache = greedy_decode(model, reference, state, output.cache, tokens.tolist(), ours[-1],
                          steps=8)
    assert_state_close(state, cache, model.config, 158)
    # a prompt shorter than K leaves zeros on the left of the conv tail, as transformers
    short = allocate(model)
    model.forward(tokens[:2], 0, short)
    output = reference(tokens[None, :2], use_cache=True)
    assert_state_close(short, output.cache, model.config, 2)
    assert not short['conv'][:, :, :2].any()


@torch.inference_mode()
def test_chunked_prefill_equals_token_by_token_decode(checkpoint):
    """Prefills of 1..70 tokens, and 70 split at 1, 17, 63, 64, 65, against decode steps."""
    model = make_model(checkpoint)
    tokens = random_tokens(model, 70, seed=2)
    stepwise = allocate(model)
    step_logits, step_states = [], []
    for position in range(70):
        step_logits.append(model.forward(tokens[position:position + 1], position, stepwise))
        step_states.append({name: stepwise[name].clone() for name in ('conv', 'recurrent')})
    step_logits = torch.stack(step_logits)  # [70, V]

    def assert_matches_steps(state, length):
        for name in ('conv', 'recurrent'):
            assert relative(state[name], step_states[length - 1][name]) <= \
                STEPWISE_STATE_RTOL, (name, length)

    for length in (1, 2, 3, 4, 5, 17, 31, 63, 64, 65, 70):  # shorter than K, chunk edges
        state = allocate(model)
        logits = model.forward(tokens[:length], 0, state, all_logits=True)
        assert float((logits - step_logits[:length]).abs().max()) <= STEPWISE_LOGITS_ATOL
        assert_matches_steps(state, length)
    for split in (1, 17, 63, 64, 65):
        state = allocate(model)
        first = model.forward(tokens[:split], 0, state, all_logits=True)
        assert_matches_steps(state, split)
        logits = torch.cat([first, model.forward(tokens[split:], split, state, all_logits=True)])
        assert float((logits - step_logits).abs().max()) <= STEPWISE_LOGITS_ATOL, split
        assert_matches_steps(state, 70)


@torch.inference_mode()
def test_distinct_out_state_is_copy_on_write(checkpoint):
    """A distinct out_state leaves state's conv/recurrent untouched, writes all of its own."""
    model = make_model(checkpoint)
    state = allocate(model)
    tokens = random_tokens(model, 91, seed=3)
    model.forward(tokens[:60], 0, state)
    for start, end in ((60, 90), (90, 91)):  # a prefill chunk, then a decode step
        before = {name: state[name].clone() for name in ('conv', 'recurrent')}
        # NaN everywhere: an element the forward pass does not write stays unequal
        out_state = {name: torch.full_like(state[name], float('nan'))
                     for name in ('conv', 'recurrent')}
        distinct = model.forward(tokens[start:end], start, state, all_logits=True,
                                 out_state=out_state)
        for name in ('conv', 'recurrent'):
            assert torch.equal(state[name], before[name]), name
        in_place = model.forward(tokens[start:end], start, state, all_logits=True)
        assert torch.equal(distinct, in_place)
        for name in ('conv', 'recurrent'):
            assert torch.equal(out_state[name], state[name]), name


@torch.inference_mode()
def test_start_pos_zero_ignores_stale_state(checkpoint):
    """At position 0 a recycled slot's conv/recurrent (random here) do not matter, bitwise."""
    model = make_model(checkpoint)
    tokens = random_tokens(model, 40, seed=4)
    for length in (40, 1):
        clean = allocate(model)
        stale = allocate(model)
        generator = torch.Generator().manual_seed(length)
        for name in ('kv', 'conv', 'recurrent'):
            stale[name].copy_(torch.randn(stale[name].shape, generator=generator) * 10)
        expected = model.forward(tokens[:length], 0, clean, all_logits=True)
        assert torch.equal(model.forward(tokens[:length], 0, stale, all_logits=True), expected)
        for name in ('conv', 'recurrent'):
            assert torch.equal(stale[name], clean[name]), name


@torch.inference_mode()
def test_bfloat16_runs_close_to_float32_and_to_transformers(checkpoint):
    """bf16: conv and kv in bf16, recurrent fp32; near fp32; equal to transformers' bf16."""
    from transformers import AutoModelForCausalLM

    model16 = make_model(checkpoint, torch.bfloat16)
    model32 = make_model(checkpoint)
    state16, state32 = allocate(model16), allocate(model32)
    assert state16['kv'].dtype == torch.bfloat16
    assert state16['conv'].dtype == torch.bfloat16
    assert state16['recurrent'].dtype == torch.float32
    tokens = random_tokens(model32, 100, seed=5)
    logits16 = model16.forward(tokens, 0, state16, all_logits=True)
    logits32 = model32.forward(tokens, 0, state32, all_logits=True)
    assert logits16.dtype == torch.float32
    assert rms_relative(logits16, logits32) <= BF16_RMS_RTOL
    agreement = float((logits16.argmax(-1) == logits32.argmax(-1)).float().mean())
    assert agreement >= BF16_MIN_ARGMAX_AGREEMENT
    reference16 = AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.bfloat16)
    assert rms_relative(logits16, reference16.eval()(tokens[None]).logits[0]) <= \
        BF16_REFERENCE_RMS_RTOL
    logits32 = logits32[-1]
    for position in range(100, 108):  # decode fp32's greedy tokens with both
        step = logits32.argmax()[None]
        logits16 = model16.forward(step, position, state16)
        logits32 = model32.forward(step, position, state32)
        assert rms_relative(logits16, logits32) <= BF16_RMS_RTOL
    for name in ('conv', 'recurrent'):
        assert rms_relative(state16[name], state32[name]) <= BF16_RMS_RTOL, name


def write_wrapper_checkpoint(directory, hf_config, weights, tied):
    """
    Rewrite the text checkpoint in the vision-language layout of the published Qwen3.5.

    ``tied``: None (untied), ``'absent'`` (tied, no lm_head.weight) or ``'stale'`` (tied, a
    random lm_head.weight left in the file).
    """
    from safetensors.torch import save_file

    text = {key: value for key, value in hf_config.items() if key != 'architectures'}
    wrapper = {'model_type': 'qwen3_5', 'architectures': ['Qwen3_5ForConditionalGeneration'],
               'text_config': dict(text, tie_word_embeddings=bool(tied)),
               'vision_config': {'depth': 2, 'hidden_size': 32},
               'tie_word_embeddings': bool(tied)}
    renamed = {('model.language_model.' + name[len('model.'):] if name.startswith('model.')
                else name): tensor.contiguous() for name, tensor in weights.items()}
    if tied:
        renamed['lm_head.weight'] = torch.randn(renamed['lm_head.weight'].shape)
        if tied == 'absent':
            del renamed['lm_head.weight']
    renamed['mtp.fc.weight'] = torch.randn(8, 8)  # multi-token prediction head: ignored
    renamed['model.visual.x'] = torch.randn(3)  # vision tower: ignored
    directory.mkdir()
    (directory / 'config.json').write_text(json.dumps(wrapper))
    save_file(renamed, directory / 'model.safetensors')
    return directory


@torch.inference_mode()
def test_vision_language_wrapper_layout_loads_the_same_model(checkpoint, tmp_path):
    """``qwen3_5`` config with ``text_config`` and ``model.language_model.*`` weights."""
    _, hf_config, weights = checkpoint
    plain = make_model(checkpoint)
    tokens = random_tokens(plain, 80, seed=6)
    wrapper_config, wrapper_weights = load_hf_directory(
        write_wrapper_checkpoint(tmp_path / 'untied', hf_config, weights, tied=None))
    config = Qwen35Config.from_hf(wrapper_config)
    assert config.model_type == 'qwen3_5'
    assert config.layer_types == plain.config.layer_types
    wrapped = Qwen35Model(config, wrapper_weights, torch.float32, CPU, MAX_SEQ_LEN)
    expected_state, state = allocate(plain), allocate(wrapped)
    assert torch.equal(wrapped.forward(tokens, 0, state, all_logits=True),
                       plain.forward(tokens, 0, expected_state, all_logits=True))
    assert torch.equal(wrapped.forward(tokens[:1], 80, state),
                       plain.forward(tokens[:1], 80, expected_state))
    # tied: without lm_head.weight the head is the embedding; a stale lm_head.weight left in
    # the file is used, as transformers 5.24 does (it refuses to tie differing weights)
    from transformers import AutoModelForCausalLM

    untied = dict(weights, **{'lm_head.weight': weights['model.embed_tokens.weight']})
    expected = Qwen35Model(Qwen35Config.from_hf(hf_config), untied, torch.float32, CPU,
                           MAX_SEQ_LEN)
    for tied in ('absent', 'stale'):
        directory = write_wrapper_checkpoint(tmp_path / tied, hf_config, weights, tied=tied)
        tied_config, tied_weights = load_hf_directory(directory)
        assert tied_config['tie_word_embeddings']
        model = Qwen35Model(Qwen35Config.from_hf(tied_config), tied_weights, torch.float32,
                            CPU, MAX_SEQ_LEN)
        ours = model.forward(tokens, 0, allocate(model), all_logits=True)
        if tied == 'absent':
            assert torch.equal(ours, expected.forward(tokens, 0, allocate(expected),
                                                      all_logits=True))
        else:
            reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
            theirs = reference.eval()(tokens[None]).logits[0]
            assert float((ours - theirs).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize('hf_config, problem', [
    ({'model_type': 'qwen3_5_moe', 'text_config': {'model_type': 'qwen3_5_moe_text'}},
     'Mixture-of-Experts'),
    ({'model_type': 'qwen3_next'}, 'Mixture-of-Experts'),
    ({'model_type': 'llama'}, 'not a Qwen3.5'),
    (dict(QWEN3_5_0_8B_TEXT, num_experts=8, num_experts_per_tok=2), 'Mixture-of-Experts'),
    ({'model_type': 'qwen3_5', 'text_config': {'model_type': 'qwen3_5_moe_text'}},
     'qwen3_5_moe_text'),
    (dict(QWEN3_5_0_8B_TEXT, layer_types=['mamba'] * 24), 'layer_types'),
])
def test_from_hf_refuses_unsupported_configs(hf_config, problem):
    """Refuse MoE variants, other families and unknown layer kinds (InvalidArgumentError)."""
    with pytest.raises(InvalidArgumentError, match=problem):
        Qwen35Config.from_hf(hf_config)


@pytest.mark.parametrize('rope_variant', [
    {}, {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 262144}])
def test_rope_tables_equal_transformers_text_positions(rope_variant):
    """Qwen3.5-0.8B's interleaved mrope at text positions: our 1-D table, bitwise."""
    from transformers import AutoConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    text = dict(QWEN3_5_0_8B_TEXT, rope_parameters=dict(
        QWEN3_5_0_8B_TEXT['rope_parameters'], **rope_variant))
    config = Qwen35Config.from_hf({'model_type': 'qwen3_5', 'text_config': text,
                                   'tie_word_embeddings': True})
    assert config.num_full_layers == 6 and config.num_linear_layers == 18
    assert config.conv_dim == 6144 and config.tie_word_embeddings
    cos, sin = rope_tables(config, 4096)
    assert cos.shape == (4096, 64)  # partial RoPE: a quarter of head_dim 256
    reference = Qwen3_5TextRotaryEmbedding(AutoConfig.for_model(
        'qwen3_5_text', **{key: value for key, value in text.items() if key != 'model_type'}))
    # as Qwen3_5TextModel builds them for text: four equal rows (text, t, h, w), rope gets 3
    position_ids = torch.arange(4096).view(1, 1, -1).expand(4, 1, -1)[1:]
    expected_cos, expected_sin = reference(torch.zeros(1), position_ids)
    assert torch.equal(cos, expected_cos[0]) and torch.equal(sin, expected_sin[0])
    # the sections would matter for distinct rows (images): the check is not vacuous
    vision_ids = torch.stack([position_ids[0], position_ids[1] // 2, position_ids[2] // 3])
    assert not torch.equal(reference(torch.zeros(1), vision_ids)[0][0], cos)
