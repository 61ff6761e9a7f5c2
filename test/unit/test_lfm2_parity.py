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
"""Parity of the LFM2 model file with transformers, and its conv-state contract."""

import json

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.loader import load_hf_directory
from capsule_ros.runtime.models.lfm2 import Lfm2Config, Lfm2Model
from capsule_ros.runtime.state import StateLayout
from capsule_ros.runtime.testing import write_tiny_model
import pytest
import torch


CPU = torch.device('cpu')
MAX_SEQ_LEN = 512
# fp32 against transformers (measured: logits 7e-7, conv state 0 to 1e-7, KV 4e-7)
LOGITS_TOLERANCE = 1e-4
STATE_TOLERANCE = 1e-5
# fp32 chunked prefill against token-by-token decode of our own model (measured: 1.2e-6 on
# logits, 6e-7 on the conv state: the chunk size changes matmul shapes, so not bitwise)
STEPWISE_TOLERANCE = 2e-5
# bf16 against fp32 on random weights whose logits reach about 2 and conv states about 0.5
# (measured: 0.022 on logits, 0.005 on the conv state)
BF16_LOGITS_TOLERANCE = 0.08
BF16_STATE_TOLERANCE = 0.02


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """Write one tiny LFM2 model per module: conv layers 0 and 2, attention layers 1 and 3."""
    return write_tiny_model(tmp_path_factory.mktemp('lfm2') / 'x', family='lfm2')


@pytest.fixture(scope='module')
def model(checkpoint):
    """Build our fp32 model on the tiny checkpoint."""
    hf_config, weights = load_hf_directory(checkpoint)
    return Lfm2Model(Lfm2Config.from_hf(hf_config), weights, torch.float32, CPU, MAX_SEQ_LEN)


@pytest.fixture(scope='module')
def reference(checkpoint):
    """Load transformers' model on the tiny checkpoint once per module."""
    return reference_model(checkpoint)


def reference_model(directory):
    """Load transformers' Lfm2ForCausalLM in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def returned_cache(output):
    """Return the cache of a transformers 5.x output (``cache``; was ``past_key_values``)."""
    cache = getattr(output, 'cache', None)
    return cache if cache is not None else output.past_key_values


def allocate(model):
    """Allocate zeroed slot buffers for ``model``."""
    return StateLayout(model.state_specs()).allocate(CPU)


def random_tokens(count, vocab_size, seed=0):
    """Draw ``count`` random token ids [count] int64."""
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, theirs):
    """Return the largest absolute difference, in fp32."""
    return float((ours.float() - theirs.float()).abs().max())


def assert_state_matches_reference(model, state, cache, num_positions):
    """Check conv state and KV of every layer against transformers' cache (STATE_TOLERANCE)."""
    config = model.config
    for ordinal, layer in enumerate(config.conv_layers):
        theirs = cache.layers[layer].conv_states[0][0]  # [D, K]
        assert theirs.shape == state['conv'][ordinal].shape
        assert max_diff(state['conv'][ordinal], theirs) <= STATE_TOLERANCE
    for ordinal, layer in enumerate(config.attention_layers):
        keys = cache.layers[layer].keys[0]  # [Hkv, end, hd]
        values = cache.layers[layer].values[0]
        assert keys.shape[1] == num_positions
        assert max_diff(state['kv'][ordinal, 0, :, :num_positions], keys) <= STATE_TOLERANCE
        assert max_diff(state['kv'][ordinal, 1, :, :num_positions], values) <= STATE_TOLERANCE


def test_state_layout(model):
    """kv: [attention layers, 2, Hkv, T, hd] along axis 3; conv: [conv layers, D, K]."""
    config = model.config
    specs = {spec.name: spec for spec in model.state_specs()}
    assert config.conv_layers == (0, 2) and config.attention_layers == (1, 3)
    assert specs['kv'].shape == (2, 2, config.num_kv_heads, MAX_SEQ_LEN, config.head_dim)
    assert specs['kv'].seq_axis == 3
    assert specs['conv'].shape == (2, config.hidden_size, config.conv_kernel_size)
    assert specs['conv'].seq_axis is None
    assert model.weights_format == 'torch.float32 int4=0/16'


def test_chunked_prefill_and_decode_match_transformers(reference, model):
    """
    Prefill of 210 tokens in 3 chunks of 70, then 32 greedy decode steps, against transformers.

    Logits within LOGITS_TOLERANCE and the same greedy tokens; the conv state (the last K inputs
    of each convolution) and the KV within STATE_TOLERANCE of transformers' cache after the
    prefill and after the decode.
    """
    state = allocate(model)
    tokens = random_tokens(210, model.config.vocab_size)
    with torch.inference_mode():
        output = reference(tokens[None], use_cache=True)
        cache = returned_cache(output)
        ours = torch.cat([model.forward(tokens[start:start + 70], start, state, all_logits=True)
                          for start in (0, 70, 140)])  # [210, V]
        assert max_diff(ours, output.logits[0]) <= LOGITS_TOLERANCE
        assert_state_matches_reference(model, state, cache, 210)
        sequence = tokens.tolist()
        logits = ours[-1]
        for _ in range(32):
            token = int(logits.argmax())
            sequence.append(token)
            logits = model.forward(torch.tensor([token]), len(sequence) - 1, state)
            output = reference(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = returned_cache(output)
            assert int(output.logits[0, -1].argmax()) == int(logits.argmax())
            assert max_diff(logits, output.logits[0, -1]) <= LOGITS_TOLERANCE
        assert_state_matches_reference(model, state, cache, len(sequence))


@pytest.mark.parametrize('num_tokens', [1, 2, 3, 5])
def test_short_prompt_conv_state_is_left_padded(reference, model, num_tokens):
    """Fewer than K tokens: the state holds them last, zeros before, as in transformers."""
    state = allocate(model)
    tokens = random_tokens(num_tokens, model.config.vocab_size, seed=1)
    with torch.inference_mode():
        output = reference(tokens[None], use_cache=True)
        logits = model.forward(tokens, 0, state)
    assert max_diff(logits, output.logits[0, -1]) <= LOGITS_TOLERANCE
    assert_state_matches_reference(model, state, returned_cache(output), num_tokens)
    padding = model.config.conv_kernel_size - num_tokens
    if padding > 0:
        assert not state['conv'][:, :, :padding].any()
        assert state['conv'][:, :, padding:].abs().min() > 0


SPLITS = {
    'one-then-rest': [1, 69],
    'seventeen': [17, 17, 17, 17, 2],
    'sixty-three': [63, 7],
    'sixty-four': [64, 6],
    'sixty-five': [65, 5],
    'ragged': [2, 1, 2, 30, 1, 34],
}


def test_chunked_prefill_matches_token_by_token(model):
    """
    Any split of 70 tokens into chunks gives the token-by-token state and logits.

    After every chunk: the conv state and the chunk's logits at every position within
    STEPWISE_TOLERANCE of one-token-at-a-time decode; KV as well.
    """
    tokens = random_tokens(70, model.config.vocab_size, seed=2)
    stepwise = allocate(model)
    step_logits = []  # [V] per position
    step_conv = []  # [Lc, D, K] after each position
    for position in range(70):
        step_logits.append(model.forward(tokens[position:position + 1], position, stepwise))
        step_conv.append(stepwise['conv'].clone())
    for name, split in SPLITS.items():
        assert sum(split) == 70, name
        state = allocate(model)
        start = 0
        for size in split:
            logits = model.forward(tokens[start:start + size], start, state, all_logits=True)
            start += size
            expected = torch.stack(step_logits[start - size:start])  # [size, V]
            assert max_diff(logits, expected) <= STEPWISE_TOLERANCE, (name, start)
            assert max_diff(state['conv'], step_conv[start - 1]) <= STEPWISE_TOLERANCE, (
                name, start)
        assert max_diff(state['kv'][:, :, :, :70], stepwise['kv'][:, :, :, :70]) <= (
            STEPWISE_TOLERANCE), name


@pytest.mark.parametrize('num_tokens', [1, 9])
def test_distinct_out_state_leaves_state_untouched(model, num_tokens):
    """
    Copy-on-write: with a distinct ``out_state``, ``state['conv']`` stays bitwise as it was.

    The logits and the new conv state equal the in-place run bitwise, and every element of a
    NaN-filled out buffer is written.
    """
    tokens = random_tokens(40 + num_tokens, model.config.vocab_size, seed=3)
    state = allocate(model)
    model.forward(tokens[:40], 0, state)
    in_place = {name: buffer.clone() for name, buffer in state.items()}
    conv_before = state['conv'].clone()
    out_state = {'conv': torch.full_like(state['conv'], float('nan'))}
    logits = model.forward(tokens[40:], 40, state, out_state=out_state)
    assert torch.equal(state['conv'], conv_before)
    assert not out_state['conv'].isnan().any()
    expected = model.forward(tokens[40:], 40, in_place)
    assert torch.equal(logits, expected)
    assert torch.equal(out_state['conv'], in_place['conv'])
    assert torch.equal(state['kv'], in_place['kv'])  # KV is written in place either way
    assert not torch.equal(in_place['conv'], conv_before)  # the step did change the state


@pytest.mark.parametrize('num_tokens', [1, 20])
def test_start_pos_zero_ignores_stale_conv_state(model, num_tokens):
    """At position 0 a recycled slot's conv (and KV) garbage does not change a bit."""
    tokens = random_tokens(num_tokens, model.config.vocab_size, seed=4)
    clean = allocate(model)
    expected = model.forward(tokens, 0, clean, all_logits=True)
    stale = allocate(model)
    generator = torch.Generator().manual_seed(5)
    for buffer in stale.values():
        buffer.copy_(torch.randn(buffer.shape, generator=generator) * 10)
    assert torch.equal(model.forward(tokens, 0, stale, all_logits=True), expected)
    assert torch.equal(stale['conv'], clean['conv'])
    # the same with a distinct, stale out buffer
    stale_in = {'kv': stale['kv'], 'conv': torch.randn(stale['conv'].shape) * 10}
    out_state = {'conv': torch.full_like(stale['conv'], float('nan'))}
    logits = model.forward(tokens, 0, stale_in, all_logits=True, out_state=out_state)
    assert torch.equal(logits, expected)
    assert torch.equal(out_state['conv'], clean['conv'])


def test_bf16_close_to_fp32(checkpoint, model):
    """bf16 runs chunked prefill and decode close to fp32, with bf16 state buffers."""
    hf_config, weights = load_hf_directory(checkpoint)
    bf16_model = Lfm2Model(Lfm2Config.from_hf(hf_config), weights, torch.bfloat16, CPU,
                           MAX_SEQ_LEN)
    bf16_state = allocate(bf16_model)
    fp32_state = allocate(model)
    assert bf16_state['conv'].dtype == torch.bfloat16
    assert bf16_state['kv'].dtype == torch.bfloat16
    assert bf16_model.weights_format.startswith('torch.bfloat16')
    tokens = random_tokens(140, model.config.vocab_size, seed=6)
    for start in (0, 70):
        ours = bf16_model.forward(tokens[start:start + 70], start, bf16_state, all_logits=True)
        expected = model.forward(tokens[start:start + 70], start, fp32_state, all_logits=True)
        assert ours.dtype == torch.float32 and ours.isfinite().all()
        assert max_diff(ours, expected) <= BF16_LOGITS_TOLERANCE
    for position in range(140, 148):  # decode the fp32 model's greedy continuation
        token = expected.argmax(dim=-1)[-1:]
        ours = bf16_model.forward(token, position, bf16_state, all_logits=True)
        expected = model.forward(token, position, fp32_state, all_logits=True)
        assert max_diff(ours, expected) <= BF16_LOGITS_TOLERANCE
    assert max_diff(bf16_state['conv'], fp32_state['conv']) <= BF16_STATE_TOLERANCE
    assert bf16_state['conv'].dtype == torch.bfloat16


def test_biases_and_adjusted_feed_forward_match_transformers(tmp_path):
    """conv_bias, block_auto_adjust_ff_dim (MLP 128 -> 256) and an untied head, vs transformers."""
    overrides = {'conv_bias': True, 'block_auto_adjust_ff_dim': True,
                 'tie_word_embeddings': False}
    directory = write_tiny_model(tmp_path / 'x', overrides, family='lfm2')
    hf_config, weights = load_hf_directory(directory)
    config = Lfm2Config.from_hf(hf_config)
    assert config.intermediate_size == 256  # int(2 * 128 / 3) = 85, rounded up to 256
    assert 'lm_head.weight' in weights and 'model.layers.0.conv.conv.bias' in weights
    model = Lfm2Model(config, weights, torch.float32, CPU, MAX_SEQ_LEN)
    reference = reference_model(directory)
    state = allocate(model)
    tokens = random_tokens(50, config.vocab_size, seed=7)
    with torch.inference_mode():
        output = reference(tokens[None], use_cache=True)
        cache = returned_cache(output)
        ours = torch.cat([model.forward(tokens[:31], 0, state, all_logits=True),
                          model.forward(tokens[31:], 31, state, all_logits=True)])
        assert max_diff(ours, output.logits[0]) <= LOGITS_TOLERANCE
        for position in range(50, 54):
            token = int(ours[-1].argmax())
            ours = model.forward(torch.tensor([token]), position, state, all_logits=True)
            output = reference(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = returned_cache(output)
            assert max_diff(ours, output.logits[0]) <= LOGITS_TOLERANCE
        assert_state_matches_reference(model, state, cache, 54)


# LFM2-350M's config.json fields that decide shapes (older checkpoints spell the MLP width
# ``block_ff_dim`` and list attention layers as ``full_attn_idxs``)
LFM2_350M = {
    'model_type': 'lfm2', 'vocab_size': 65536, 'hidden_size': 1024, 'num_hidden_layers': 16,
    'num_attention_heads': 16, 'num_key_value_heads': 8, 'max_position_embeddings': 128000,
    'norm_eps': 1e-5, 'conv_bias': False, 'conv_L_cache': 3, 'rope_theta': 1000000.0,
    'block_ff_dim': 6656, 'intermediate_size': 6656, 'block_auto_adjust_ff_dim': True,
    'block_ffn_dim_multiplier': 1.0, 'block_multiple_of': 256, 'tie_embedding': True,
    'full_attn_idxs': [2, 5, 8, 10, 12, 14],
}


@pytest.mark.parametrize('drop', [(), ('block_ff_dim', 'tie_embedding'), ('full_attn_idxs',)])
def test_config_reads_like_transformers(drop):
    """Layer kinds, MLP width, head size and tying as transformers derives them."""
    from transformers import AutoConfig
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    hf_config = {key: value for key, value in LFM2_350M.items() if key not in drop}
    config = Lfm2Config.from_hf(hf_config)
    reference = AutoConfig.for_model('lfm2', **{
        key: value for key, value in hf_config.items() if key != 'model_type'})
    with torch.device('meta'):
        width = Lfm2MLP(reference).w1.out_features
    assert config.intermediate_size == width
    assert config.layer_types == tuple(reference.layer_types)
    assert config.tie_word_embeddings == reference.tie_word_embeddings
    assert config.head_dim == 64
    assert json.loads(config.hf_config_json) == hf_config
    if not drop:
        assert config.intermediate_size == 4608  # int(2 * 6656 / 3) rounded up to 256
        assert len(config.attention_layers) == 6 and len(config.conv_layers) == 10


REFUSED = {
    'not-lfm2': ({'model_type': 'llama'}, 'not an LFM2-family model'),
    'moe': ({'model_type': 'lfm2_moe'}, 'not an LFM2-family model'),
    'unknown-layer-kind': ({'layer_types': ['conv', 'sliding_attention', 'conv',
                                            'full_attention']}, 'sliding_attention'),
    'layer-count': ({'layer_types': ['conv', 'full_attention']}, 'layer_types has 2'),
    'gqa-groups': ({'num_key_value_heads': 3}, 'multiple of'),
    'dynamic-rope': ({'rope_parameters': {'rope_type': 'dynamic', 'factor': 2.0,
                                          'rope_theta': 1e6}}, 'dynamic'),
    'missing-field': ({'hidden_size': None}, 'hidden_size'),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_from_hf_refuses_unsupported_configs(case):
    """Configs the model cannot run raise InvalidArgumentError naming the problem."""
    changes, message = REFUSED[case]
    hf_config = {'model_type': 'lfm2', 'vocab_size': 128, 'hidden_size': 64,
                 'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2,
                 'layer_types': ['conv', 'full_attention', 'conv', 'full_attention']}
    hf_config.update(changes)
    hf_config = {key: value for key, value in hf_config.items() if value is not None}
    with pytest.raises(InvalidArgumentError, match=message):
        Lfm2Config.from_hf(hf_config)
