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
LFM2-family decoder (Liquid AI LFM2, LFM2.5) over static per-slot KV and conv buffers.

One readable file in the spirit of gpt-fast's ``model.py``. Most layers mix tokens with a
gated short convolution: ``in_proj`` gives ``B, C, x``, a depthwise causal convolution of
kernel ``K = conv_L_cache`` runs over ``B * x``, and ``C`` gates its output. The
``full_attention`` layers are GQA attention with RMSNorm on each query and key head and RoPE.
Every layer ends in a SwiGLU MLP; the last norm is called ``embedding_norm`` in the checkpoint
although it follows the last layer.

A slot holds two buffers: ``kv`` (keys and values of the attention layers, written in place by
position) and ``conv`` (the last K inputs of each convolution, the transformers 5.x cache
convention, left-padded with zeros). The conv state is read from ``state`` and its new value
written to ``out_state``, so a capsule that references the old buffer stays intact.
"""

from dataclasses import dataclass, field
import json

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models.decoder import causal_mask, final_logits
from capsule_ros.runtime.models.linear import LinearFactory
from capsule_ros.runtime.models.rope import rope_tables
from capsule_ros.runtime.state import BufferSpec, StateKind
import torch
import torch.nn.functional as F  # noqa: N812


SUPPORTED_MODEL_TYPES = ('lfm2',)
CONV_LAYER = 'conv'
ATTENTION_LAYER = 'full_attention'


def _feed_forward_size(hf_config: dict) -> int:
    """MLP width as transformers' ``Lfm2MLP`` computes it from the ``block_*`` fields."""
    # ``block_ff_dim`` (older LFM2 checkpoints) overrides ``intermediate_size``
    size = hf_config.get('block_ff_dim', hf_config.get('intermediate_size', 12288))
    if hf_config.get('block_auto_adjust_ff_dim', True):
        size = int(2 * size / 3)
        multiplier = hf_config.get('block_ffn_dim_multiplier', 1.0)
        if multiplier is not None:
            multiple_of = hf_config.get('block_multiple_of', 256)
            size = int(multiplier * size)
            size = multiple_of * ((size + multiple_of - 1) // multiple_of)
    return size


def _layer_types(hf_config: dict, num_layers: int) -> tuple[str, ...]:
    """``layer_types``, or (older checkpoints) attention at ``full_attn_idxs``."""
    layer_types = hf_config.get('layer_types')
    if layer_types is None:
        attention_layers = hf_config.get('full_attn_idxs')
        if attention_layers is None:  # transformers' default: attention everywhere
            attention_layers = range(num_layers)
        layer_types = [ATTENTION_LAYER if index in attention_layers else CONV_LAYER
                       for index in range(num_layers)]
    return tuple(layer_types)


@dataclass(frozen=True)
class Lfm2Config:
    """Architecture hyper-parameters, read once from a Hugging Face ``config.json`` dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the MLP width after transformers' block_auto_adjust_ff_dim rule
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    conv_kernel_size: int  # conv_L_cache: the kernel and the number of inputs the state keeps
    conv_bias: bool
    layer_types: tuple[str, ...]  # 'conv' or 'full_attention' per layer
    # The whole source config as canonical JSON: RoPE comes from transformers' own code, and
    # the fingerprint covers every field.
    hf_config_json: str = field(repr=False)

    def __post_init__(self):
        """Validate what the forward pass relies on."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidArgumentError(
                f'model_type {self.model_type!r} is not an LFM2-family model; '
                f'supported: {", ".join(SUPPORTED_MODEL_TYPES)}')
        if len(self.layer_types) != self.num_layers:
            raise InvalidArgumentError(
                f'layer_types has {len(self.layer_types)} entries for '
                f'num_hidden_layers={self.num_layers}')
        unknown = sorted(set(self.layer_types) - {CONV_LAYER, ATTENTION_LAYER})
        if unknown:
            raise InvalidArgumentError(
                f'LFM2 layer types {unknown} are not supported; supported: '
                f'{CONV_LAYER}, {ATTENTION_LAYER}')
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f'num_attention_heads ({self.num_heads}) must be a multiple of '
                f'num_key_value_heads ({self.num_kv_heads})')
        if self.conv_kernel_size < 1:
            raise InvalidArgumentError(f'conv_L_cache must be >= 1, got {self.conv_kernel_size}')

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Return the indices of the attention layers (the KV buffer's first axis, in order)."""
        return tuple(i for i, kind in enumerate(self.layer_types) if kind == ATTENTION_LAYER)

    @property
    def conv_layers(self) -> tuple[int, ...]:
        """Return the indices of the conv layers (the conv buffer's first axis, in order)."""
        return tuple(i for i, kind in enumerate(self.layer_types) if kind == CONV_LAYER)

    @classmethod
    def from_hf(cls, hf_config: dict) -> 'Lfm2Config':
        """Build from a Hugging Face config dict (as in ``config.json``), with its defaults."""
        missing = [key for key in ('vocab_size', 'hidden_size', 'num_hidden_layers',
                                   'num_attention_heads') if key not in hf_config]
        if missing:
            raise InvalidArgumentError(f'LFM2 config.json lacks {", ".join(missing)}')
        rope = hf_config.get('rope_parameters') or hf_config.get('rope_scaling') or {}
        if rope.get('rope_type', rope.get('type')) == 'dynamic':
            raise InvalidArgumentError(
                'dynamic NTK RoPE scaling is not supported (static buffers)')
        num_layers = hf_config['num_hidden_layers']
        num_heads = hf_config['num_attention_heads']
        hidden_size = hf_config['hidden_size']
        return cls(
            model_type=hf_config.get('model_type', 'lfm2'),
            vocab_size=hf_config['vocab_size'],
            hidden_size=hidden_size,
            intermediate_size=_feed_forward_size(hf_config),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf_config.get('num_key_value_heads') or num_heads,
            head_dim=hf_config.get('head_dim') or hidden_size // num_heads,
            norm_eps=hf_config.get('norm_eps', 1e-5),
            max_position_embeddings=hf_config.get('max_position_embeddings', 128000),
            # ``tie_embedding`` (older LFM2 checkpoints) overrides ``tie_word_embeddings``
            tie_word_embeddings=bool(hf_config.get(
                'tie_embedding', hf_config.get('tie_word_embeddings', True))),
            conv_kernel_size=hf_config.get('conv_L_cache', 3),
            conv_bias=bool(hf_config.get('conv_bias', False)),
            layer_types=_layer_types(hf_config, num_layers),
            hf_config_json=json.dumps(hf_config, sort_keys=True, default=str),
        )


class Lfm2Model:
    """Weights plus a forward pass over one slot's ``kv`` and ``conv`` buffers."""

    family = 'lfm2'

    def __init__(self, config: Lfm2Config, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device, max_seq_len: int,
                 quantization: str = 'none'):
        """
        Take Hugging Face-named weights, fuse q/k/v and w1/w3, move to dtype and device.

        ``quantization`` is LinearFactory's: ``none``, ``int4`` or ``auto``.
        """
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_seq_len = max_seq_len
        self.linears = LinearFactory(dtype, device, quantization)
        prepare = self.linears.prepare

        def source(name):  # fp32, as stored
            return self._source(weights, name)

        def take(name):
            return source(name).to(dtype).contiguous()

        def conv_bias(name):  # conv_bias puts a bias on in_proj, the convolution and out_proj
            return source(name) if config.conv_bias else None

        hidden_size = config.hidden_size
        kernel_size = config.conv_kernel_size
        self.embed_tokens = take('model.embed_tokens.weight')  # [V, D]
        self.final_norm = take('model.embedding_norm.weight')  # [D]: after the last layer
        if config.tie_word_embeddings or 'lm_head.weight' not in weights:
            lm_head = source('model.embed_tokens.weight')
        else:
            lm_head = source('lm_head.weight')  # [V, D]
        self.lm_head = prepare(lm_head, quantize=False)
        self.layers = []
        for index, kind in enumerate(config.layer_types):
            prefix = f'model.layers.{index}.'
            if kind == ATTENTION_LAYER:
                self.layers.append(self.attention_layer_weights(weights, prefix))
                continue
            layer = self._feed_forward_weights(weights, prefix, kind)
            conv = prefix + 'conv.'
            conv_weight = source(conv + 'conv.weight')  # [D, 1, K]: depthwise
            if conv_weight.shape != (hidden_size, 1, kernel_size):
                raise InvalidArgumentError(
                    f'{conv}conv.weight has shape {tuple(conv_weight.shape)}, expected '
                    f'{(hidden_size, 1, kernel_size)} (conv_L_cache)')
            # [K, D]: the kernel rounded to the model dtype as transformers' conv weight is,
            # then kept in fp32 for the accumulation
            layer['conv_taps'] = conv_weight[:, 0].to(dtype).float().t().contiguous()
            bias = conv_bias(conv + 'conv.bias')  # [D], rounded like the taps
            layer['conv_bias'] = None if bias is None else bias.to(dtype).float()
            # [3 D, D]: B, C and x, in this order along the output
            layer['in_proj'] = prepare(source(conv + 'in_proj.weight'),
                                       conv_bias(conv + 'in_proj.bias'))
            layer['out_proj'] = prepare(source(conv + 'out_proj.weight'),
                                        conv_bias(conv + 'out_proj.bias'))  # [D, D]
            self.layers.append(layer)
        # the ordinal of each layer within its kind: its index into the kv or conv buffer
        self.state_index = {}
        for kind_layers in (config.attention_layers, config.conv_layers):
            self.state_index.update({layer: i for i, layer in enumerate(kind_layers)})
        # the initial conv state: no inputs seen yet
        self.zero_conv_state = torch.zeros(
            hidden_size, kernel_size, dtype=dtype, device=device)  # [D, K]
        cos, sin = rope_tables(config, max_seq_len)
        half = config.head_dim // 2
        self.rope_cos = cos.to(device=device, dtype=dtype)  # [T, hd]
        # rotate_half(x) * sin == roll(x, hd / 2) * [-sin_1, sin_2]: one op instead of four
        self.rope_sin_signed = torch.cat(
            (-sin[:, :half], sin[:, half:]), dim=-1).to(device=device, dtype=dtype)  # [T, hd]
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.group_size = config.num_heads // config.num_kv_heads
        self.qk_heads = config.num_heads + config.num_kv_heads

    def _source(self, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Weight ``name`` in fp32 on the device, as stored; refused by name when missing."""
        if name not in weights:
            raise InvalidArgumentError(f'LFM2 checkpoint lacks weight {name}')
        return weights[name].to(device=self.device, dtype=torch.float32)

    def _feed_forward_weights(self, weights: dict[str, torch.Tensor], prefix: str,
                              kind: str) -> dict:
        """Prepare the norms and SwiGLU MLP of layer ``prefix*``, which every layer has."""
        config = self.config
        feed_forward = prefix + 'feed_forward.'
        w1 = self._source(weights, feed_forward + 'w1.weight')  # [I, D]
        if w1.shape != (config.intermediate_size, config.hidden_size):
            raise InvalidArgumentError(
                f'{feed_forward}w1.weight has shape {tuple(w1.shape)}, the config gives '
                f'{(config.intermediate_size, config.hidden_size)} (block_* fields)')
        return {
            'kind': kind,
            'operator_norm': self.norm_weight(
                self._source(weights, prefix + 'operator_norm.weight')),  # [D]
            'ffn_norm': self.norm_weight(self._source(weights, prefix + 'ffn_norm.weight')),
            # [2 * I, D]: one matmul for gate (w1) and up (w3)
            'w13': self.linears.prepare(
                torch.cat([w1, self._source(weights, feed_forward + 'w3.weight')])),
            'w2': self.linears.prepare(self._source(weights, feed_forward + 'w2.weight')),
        }

    def attention_layer_weights(self, weights: dict[str, torch.Tensor], prefix: str) -> dict:
        """Prepare attention layer ``prefix*`` (a main layer or an MTP head's block)."""
        config = self.config
        layer = self._feed_forward_weights(weights, prefix, ATTENTION_LAYER)
        attention = prefix + 'self_attn.'
        # [(H + 2 * Hkv) * hd, D]: one matmul for q, k and v
        layer['qkv'] = self.linears.prepare(torch.cat(
            [self._source(weights, attention + f'{p}_proj.weight') for p in 'qkv']))
        layer['out_proj'] = self.linears.prepare(
            self._source(weights, attention + 'out_proj.weight'))  # [D, H hd]
        # [H + Hkv, 1, hd]: q_layernorm for the query heads, k_layernorm for the keys
        layer['qk_norm'] = torch.cat([
            self.norm_weight(self._source(weights, attention + 'q_layernorm.weight')).expand(
                config.num_heads, -1),
            self.norm_weight(self._source(weights, attention + 'k_layernorm.weight')).expand(
                config.num_kv_heads, -1),
        ])[:, None]
        return layer

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the scale ``_rms_norm`` applies for a checkpoint's norm weight."""
        return weight.to(device=self.device, dtype=self.dtype).contiguous()

    @property
    def weights_format(self) -> str:
        """Describe the weights decode runs on (part of the fingerprint); not the mode asked."""
        return self.linears.describe()

    def state_specs(self) -> list[BufferSpec]:
        """Name every live buffer a session slot needs for this architecture."""
        config = self.config
        # kv: [La, 2 (k, v), Hkv, T, hd], valid along axis 3 up to the session's position
        kv_shape = (len(config.attention_layers), 2, config.num_kv_heads, self.max_seq_len,
                    config.head_dim)
        # conv: [Lc, D, K], the last K convolution inputs (B * x), oldest first, whole
        conv_shape = (len(config.conv_layers), config.hidden_size, config.conv_kernel_size)
        return [BufferSpec('kv', StateKind.KV, kv_shape, self.dtype, seq_axis=3),
                BufferSpec('conv', StateKind.CONV, conv_shape, self.dtype)]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' Lfm2RMSNorm (statistics in fp32, then the scale in
        # dtype) in one fused kernel plus the scale.
        return weight * F.rms_norm(x, (x.shape[-1],), eps=self.config.norm_eps)

    def _attention(self, layer: dict, h: torch.Tensor, kv: torch.Tensor, start_pos: int,
                   cos: torch.Tensor, sin_signed: torch.Tensor,
                   attn_mask: torch.Tensor | None, first_key: int = 0) -> torch.Tensor:
        """
        GQA of ``h`` [S, D]: write its keys and values into ``kv`` [2, Hkv, T, hd], read all.

        Keys from ``first_key`` on are attended (an MTP head's cache starts at position 1).
        """
        config = self.config
        head_dim = config.head_dim
        num_tokens = h.shape[0]
        end_pos = start_pos + num_tokens
        qkv = self.linears.apply(h, layer['qkv'])  # [S, (H + 2 Hkv) hd]
        # q and k are neighbours in qkv: normalize and rotate them as one tensor
        qk = qkv[:, :self.q_size + self.kv_size].view(
            num_tokens, self.qk_heads, head_dim).transpose(0, 1)  # [H + Hkv, S, hd]
        v = qkv[:, self.q_size + self.kv_size:].view(
            num_tokens, config.num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, S, hd]
        qk = self._rms_norm(qk, layer['qk_norm'])
        qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin_signed
        q, k = qk.split((config.num_heads, config.num_kv_heads))  # [H | Hkv, S, hd]
        kv[0, :, start_pos:end_pos] = k
        kv[1, :, start_pos:end_pos] = v
        keys = kv[0, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        values = kv[1, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        if num_tokens == 1:
            # decode: the g query heads sharing a KV head act as g queries of one batch entry,
            # which is faster than broadcasting KV to all heads; 4-D inputs take the fused
            # (flash) CPU kernel, 3-D ones the slower composite path
            grouped = q.reshape(1, config.num_kv_heads, self.group_size, head_dim)
            attention = F.scaled_dot_product_attention(grouped, keys[None], values[None])
            attention = attention.reshape(1, self.q_size)  # [1, H * hd]
        else:
            attention = F.scaled_dot_product_attention(
                q[None], keys[None], values[None], attn_mask=attn_mask,
                is_causal=attn_mask is None, enable_gqa=True)  # [1, H, S, hd]
            attention = attention[0].transpose(0, 1).reshape(num_tokens, self.q_size)
        return self.linears.apply(attention, layer['out_proj'])  # [S, D]

    def _short_conv(self, layer: dict, h: torch.Tensor, previous: torch.Tensor,
                    new_state: torch.Tensor) -> torch.Tensor:
        """
        Gated short convolution of ``h`` [S, D] after the inputs in ``previous`` [D, K].

        Writes the last K inputs into ``new_state`` [D, K] (may be ``previous`` itself).
        """
        num_tokens = h.shape[0]
        kernel_size = self.config.conv_kernel_size
        b, c, x = self.linears.apply(h, layer['in_proj']).chunk(3, dim=-1)  # [S, D] each
        # [K + S, D]: the K inputs before the chunk, oldest first, then the chunk's B * x
        window = torch.cat((previous.transpose(0, 1), b * x))
        new_state.copy_(window[-kernel_size:].transpose(0, 1))
        # Output t sees inputs t - K + 1 .. t (the oldest stored input only feeds the state):
        # one multiply-add per kernel tap over the whole chunk, accumulated in fp32. It gave
        # the same bits as F.conv1d in our checks; at D = 1024 on CPU it is about 10x faster
        # for one token (20 us against 200 us) and no slower for a chunk.
        taps = layer['conv_taps']  # [K, D] fp32
        conv = window[1:1 + num_tokens] * taps[0]  # [S, D] fp32
        for tap in range(1, kernel_size):
            conv.addcmul_(window[tap + 1:tap + 1 + num_tokens], taps[tap])
        if layer['conv_bias'] is not None:
            conv += layer['conv_bias']
        y = c * conv.to(self.dtype)  # [S, D]
        return self.linears.apply(y, layer['out_proj'])

    def block_forward(self, layer: dict, x: torch.Tensor, start_pos: int, kv: torch.Tensor,
                      first_key: int = 0) -> torch.Tensor:
        """
        One attention layer over x [S, D] at ``start_pos``, writing kv [2, Hkv, T, hd].

        Keys from ``first_key`` on are attended (an MTP head's cache starts at position 1).
        """
        end_pos = start_pos + x.shape[0]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, hd]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, hd]
        attn_mask, _ = causal_mask(start_pos, end_pos, first_key, self.device)
        h = self._rms_norm(x, layer['operator_norm'])
        x = x + self._attention(layer, h, kv, start_pos, cos, sin_signed, attn_mask, first_key)
        return self._feed_forward(layer, x)

    def _feed_forward(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        h = self._rms_norm(x, layer['ffn_norm'])
        gate, up = self.linears.apply(h, layer['w13']).chunk(2, dim=-1)  # [S, I] each
        return x + self.linears.apply(F.silu(gate) * up, layer['w2'])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Fp32 logits [S, V] of final-normed hidden states [S, D] (the shared output head)."""
        return self.linears.apply(normed, self.lm_head).float()

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start_pos: int, state: dict[str, torch.Tensor],
                all_logits: bool = False,
                out_state: dict[str, torch.Tensor] | None = None,
                return_hidden: bool = False):
        """
        Run tokens at positions ``[start_pos, start_pos + S)``.

        token_ids: [S] int64. ``state['kv']`` [La, 2, Hkv, T, hd] gets their keys and values in
        place; ``state['conv']`` [Lc, D, K] is read (ignored at ``start_pos == 0``, where the
        state starts from zeros) and every element of ``out_state['conv']`` (default: the same
        buffer) is written with the new conv state. Returns fp32 logits [S, V] when
        ``all_logits`` else [V] for the last token; with ``return_hidden`` also the
        final-normed hidden states [S, D] (an MTP head's input).
        """
        if out_state is None:
            out_state = state
        kv = state['kv']  # [La, 2, Hkv, T, hd]
        conv_in = state['conv']  # [Lc, D, K]
        conv_out = out_state['conv']  # [Lc, D, K]
        num_tokens = token_ids.shape[0]
        end_pos = start_pos + num_tokens
        x = self.embed_tokens[token_ids]  # [S, D]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, hd]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, hd]
        # None: decode, or causal prefill from position 0
        attn_mask, _ = causal_mask(start_pos, end_pos, 0, self.device)
        for index, layer in enumerate(self.layers):
            ordinal = self.state_index[index]
            h = self._rms_norm(x, layer['operator_norm'])
            if layer['kind'] == ATTENTION_LAYER:
                x = x + self._attention(layer, h, kv[ordinal], start_pos, cos, sin_signed,
                                        attn_mask)
            else:
                previous = self.zero_conv_state if start_pos == 0 else conv_in[ordinal]
                x = x + self._short_conv(layer, h, previous, conv_out[ordinal])
            x = self._feed_forward(layer, x)
        return final_logits(self, x, all_logits, return_hidden)
