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
Llama-family decoder (SmolLM2, Llama 3.x, Qwen2, Qwen3 dense) over static per-slot KV buffers.

One readable file in the spirit of gpt-fast's ``model.py``: GQA, RoPE (with the scaling variants
that transformers implements), RMSNorm, SwiGLU, optional q/k norm and q/k/v bias, tied
embeddings. The KV cache of a session slot is a preallocated buffer written by position; a
forward pass allocates no cache memory.
"""

from dataclasses import dataclass, field
import json

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models.decoder import causal_mask, final_logits
from capsule_ros.runtime.models.linear import DECODE_KERNEL_MAX_ROWS, LinearFactory
from capsule_ros.runtime.models.rope import rope_tables
from capsule_ros.runtime.state import BufferSpec, StateKind
import torch
import torch.nn.functional as F  # noqa: N812


SUPPORTED_MODEL_TYPES = ('llama', 'qwen2', 'qwen3', 'mistral')


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, read once from a Hugging Face ``config.json`` dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    # The whole source config, kept as canonical JSON so RoPE scaling is computed by the
    # reference implementation (transformers) and the fingerprint covers every field.
    hf_config_json: str = field(repr=False)

    def __post_init__(self):
        """Validate shapes that the forward pass relies on."""
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f'num_attention_heads ({self.num_heads}) must be a multiple of '
                f'num_key_value_heads ({self.num_kv_heads})')
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidArgumentError(
                f'model_type {self.model_type!r} is not a Llama-family model; '
                f'supported: {", ".join(SUPPORTED_MODEL_TYPES)}')

    @classmethod
    def from_hf(cls, hf_config: dict) -> 'LlamaConfig':
        """Build from a Hugging Face config dict (as in ``config.json``)."""
        num_heads = hf_config['num_attention_heads']
        hidden_size = hf_config['hidden_size']
        model_type = hf_config.get('model_type', 'llama')
        return cls(
            model_type=model_type,
            vocab_size=hf_config['vocab_size'],
            hidden_size=hidden_size,
            intermediate_size=hf_config['intermediate_size'],
            num_layers=hf_config['num_hidden_layers'],
            num_heads=num_heads,
            num_kv_heads=hf_config.get('num_key_value_heads') or num_heads,
            head_dim=hf_config.get('head_dim') or hidden_size // num_heads,
            rms_norm_eps=hf_config.get('rms_norm_eps', 1e-6),
            max_position_embeddings=hf_config.get('max_position_embeddings', 2048),
            tie_word_embeddings=bool(hf_config.get('tie_word_embeddings', False)),
            attention_bias=bool(hf_config.get('attention_bias', model_type == 'qwen2')),
            qk_norm=model_type == 'qwen3',
            hf_config_json=json.dumps(hf_config, sort_keys=True, default=str),
        )


class LlamaModel:
    """Weights plus a forward pass that reads and writes one slot's KV buffer in place."""

    family = 'llama'

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device, max_seq_len: int,
                 quantization: str = 'none'):
        """
        Take Hugging Face-named weights, fuse q/k/v and gate/up, move to dtype and device.

        ``quantization``: ``none``; ``int4`` streams every layer linear as 4-bit groups in
        decode; ``auto`` does so in bf16 on CPU for the weights already on a 4-bit grid
        (GGUF Q4_1), where it loses nothing beyond bf16 rounding of each group's scale and
        zero (see capsule_ros.runtime.quantization).
        """
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_seq_len = max_seq_len
        self.linears = LinearFactory(dtype, device, quantization)

        def take(name):
            return weights[name].to(device=device, dtype=dtype).contiguous()

        self.embed_tokens = take('model.embed_tokens.weight')  # [V, D]
        self.final_norm = take('model.norm.weight')  # [D]
        if config.tie_word_embeddings or 'lm_head.weight' not in weights:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = take('lm_head.weight')  # [V, D]
        self.layers = [self.attention_layer_weights(weights, f'model.layers.{index}.')
                       for index in range(config.num_layers)]
        # The output head (tied to the embeddings in SmolLM2, Q8_0 in its GGUF) stays dense.
        self.lm_head_linear = self.linears.prepare(self.lm_head, quantize=False)
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

    def attention_layer_weights(self, weights: dict[str, torch.Tensor], prefix: str) -> dict:
        """Prepare one decoder layer named ``prefix*`` (a main layer or an MTP head's block)."""
        config = self.config

        def take(name):
            return weights[name].to(device=self.device, dtype=self.dtype).contiguous()

        attention = prefix + 'self_attn.'
        mlp = prefix + 'mlp.'
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = torch.cat([weights[attention + f'{p}_proj.bias'] for p in 'qkv'])
        layer = {
            'input_norm': take(prefix + 'input_layernorm.weight'),
            'post_attention_norm': take(prefix + 'post_attention_layernorm.weight'),
            # [(H + 2 * Hkv) * hd, D]: one matmul for q, k and v
            'qkv': self.linears.prepare(torch.cat(
                [weights[attention + f'{p}_proj.weight'] for p in 'qkv']), qkv_bias),
            'o': self.linears.prepare(weights[attention + 'o_proj.weight']),  # [D, H * hd]
            # [2 * I, D]: one matmul for gate and up
            'gate_up': self.linears.prepare(torch.cat(
                [weights[mlp + 'gate_proj.weight'], weights[mlp + 'up_proj.weight']])),
            'down': self.linears.prepare(weights[mlp + 'down_proj.weight']),  # [D, I]
            'qk_norm': None,
        }
        if config.qk_norm:
            # [H + Hkv, 1, hd]: q_norm for the query heads, k_norm for the key heads
            layer['qk_norm'] = torch.cat([
                take(attention + 'q_norm.weight').expand(config.num_heads, -1),
                take(attention + 'k_norm.weight').expand(config.num_kv_heads, -1)])[:, None]
        return layer

    @property
    def weights_format(self) -> str:
        """Describe the weights decode runs on (part of the fingerprint); not the mode asked."""
        return self.linears.describe()

    @property
    def int4_linears(self) -> int:
        """How many layer linears decode streams as 4-bit groups."""
        return self.linears.num_int4

    def state_specs(self) -> list[BufferSpec]:
        """Name every live buffer a session slot needs for this architecture."""
        config = self.config
        # kv: [L, 2 (k, v), Hkv, T, hd], valid along axis 3 up to the session's position
        kv_shape = (config.num_layers, 2, config.num_kv_heads, self.max_seq_len, config.head_dim)
        return [BufferSpec('kv', StateKind.KV, kv_shape, self.dtype, seq_axis=3)]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm (statistics in fp32, then the scale
        # in dtype), bit for bit, in one fused kernel plus the scale.
        return weight * F.rms_norm(x, (x.shape[-1],), eps=self.config.rms_norm_eps)

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the scale ``_rms_norm`` applies for a checkpoint's norm weight (MTP head)."""
        return weight.to(device=self.device, dtype=self.dtype).contiguous()

    def block_forward(self, layer: dict, x: torch.Tensor, start_pos: int, kv: torch.Tensor,
                      first_key: int = 0) -> torch.Tensor:
        """
        One decoder layer over x [S, D] at ``start_pos``, writing its keys into kv [2, Hkv, T, hd].

        Keys from ``first_key`` on are attended (an MTP head's cache starts at position 1).
        """
        end_pos = start_pos + x.shape[0]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, hd]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, hd]
        return self._layer(layer, x, kv, start_pos, cos, sin_signed,
                           *causal_mask(start_pos, end_pos, first_key, self.device), first_key)

    def _layer(self, layer: dict, x: torch.Tensor, kv: torch.Tensor, start_pos: int,
               cos: torch.Tensor, sin_signed: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool, first_key: int = 0) -> torch.Tensor:
        """Attention and MLP of one layer over x [S, D]; kv: its buffer [2, Hkv, T, hd]."""
        config = self.config
        head_dim = config.head_dim
        num_tokens = x.shape[0]
        end_pos = start_pos + num_tokens
        h = self._rms_norm(x, layer['input_norm'])
        # [S, (H + 2 Hkv) hd]
        qkv = self.linears.apply(h, layer['qkv'])
        # q and k are neighbours in qkv: normalize and rotate them as one tensor
        qk = qkv[:, :self.q_size + self.kv_size].view(
            num_tokens, self.qk_heads, head_dim).transpose(0, 1)  # [H + Hkv, S, hd]
        v = qkv[:, self.q_size + self.kv_size:].view(
            num_tokens, config.num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, S, hd]
        if layer['qk_norm'] is not None:
            qk = self._rms_norm(qk, layer['qk_norm'])
        qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin_signed
        q, k = qk.split((config.num_heads, config.num_kv_heads))  # [H | Hkv, S, hd]
        kv[0, :, start_pos:end_pos] = k
        kv[1, :, start_pos:end_pos] = v
        keys = kv[0, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        values = kv[1, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        if num_tokens == 1 or (start_pos > first_key and num_tokens <= DECODE_KERNEL_MAX_ROWS):
            # decode: the g query heads sharing a KV head act as g queries of one batch
            # entry, which is faster than broadcasting KV to all heads; 4-D inputs take
            # the fused (flash) CPU kernel, 3-D ones the slower composite path. A few
            # tokens (a verify pass) run it row by row: each row then attends exactly as
            # its one-token decode step would
            rows = []
            for row in range(num_tokens):
                grouped = q[:, row].reshape(1, config.num_kv_heads, self.group_size, head_dim)
                end = start_pos + row + 1 - first_key
                rows.append(F.scaled_dot_product_attention(
                    grouped, keys[None, :, :end], values[None, :, :end]).reshape(
                        1, self.q_size))
            attention = rows[0] if num_tokens == 1 else torch.cat(rows)  # [S, H * hd]
        else:
            attention = F.scaled_dot_product_attention(
                q[None], keys[None], values[None], attn_mask=attn_mask,
                is_causal=is_causal, enable_gqa=True)  # [1, H, S, hd]
            attention = attention[0].transpose(0, 1).reshape(num_tokens, self.q_size)
        x = x + self.linears.apply(attention, layer['o'])
        h = self._rms_norm(x, layer['post_attention_norm'])
        gate, up = self.linears.apply(h, layer['gate_up']).chunk(2, dim=-1)  # [S, I] each
        return x + self.linears.apply(F.silu(gate) * up, layer['down'])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Fp32 logits [S, V] of final-normed hidden states [S, D] (the shared output head)."""
        return self.linears.apply(normed, self.lm_head_linear).float()

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start_pos: int, state: dict[str, torch.Tensor],
                all_logits: bool = False,
                out_state: dict[str, torch.Tensor] | None = None,
                return_hidden: bool = False):
        """
        Run tokens at positions ``[start_pos, start_pos + S)`` and write their KV in place.

        token_ids: [S] int64; state['kv']: the slot buffer [L, 2, Hkv, T, hd]. A Llama has no
        overwritten state, so ``out_state`` has nothing to receive.
        Returns fp32 logits [S, V] when ``all_logits`` else [V] for the last token; with
        ``return_hidden`` also the final-normed hidden states [S, D] (an MTP head's input).
        """
        kv = state['kv']
        num_tokens = token_ids.shape[0]
        end_pos = start_pos + num_tokens
        x = self.embed_tokens[token_ids]  # [S, D]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, hd]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, hd]
        attn_mask, is_causal = causal_mask(start_pos, end_pos, 0, self.device)
        for index, layer in enumerate(self.layers):
            x = self._layer(layer, x, kv[index], start_pos, cos, sin_signed, attn_mask,
                            is_causal)
        return final_logits(self, x, all_logits, return_hidden)
