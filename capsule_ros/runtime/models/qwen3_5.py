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
Qwen3.5 text decoder (Qwen3.5-0.8B and its dense siblings) over static per-slot state buffers.

A hybrid: most layers are Gated DeltaNet linear attention (a depthwise causal conv1d over the
projected q/k/v, then the gated delta rule on a fixed-size fp32 state per value head), every
few layers one gated full attention (q/k RMSNorm, partial RoPE, a sigmoid output gate carried
in ``q_proj``). RMSNorms scale by ``1 + weight`` with the statistics and the scale in fp32, as
transformers' ``Qwen3_5RMSNorm``; the DeltaNet output norm scales by ``weight`` and gates by
``silu(z)``. The arithmetic follows transformers 5.24's ``Qwen3_5ForCausalLM`` and its torch
fallbacks (``torch_chunk_gated_delta_rule``, ``torch_recurrent_gated_delta_rule``,
``torch_causal_conv1d_update``).

A slot's state is three buffers: ``kv`` (full-attention layers, written by position), ``conv``
(the last K inputs of each linear layer's conv) and ``recurrent`` (each linear layer's delta-rule
state, fp32). A forward pass reads ``conv``/``recurrent`` from one dict and writes them into
another (the same by default): a capsule may keep referencing the old buffers (copy-on-write).
"""

from dataclasses import dataclass, field
import json

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models.decoder import causal_mask, final_logits
from capsule_ros.runtime.models.linear import LinearFactory
from capsule_ros.runtime.state import BufferSpec, StateKind
import torch
import torch.nn.functional as F  # noqa: N812


SUPPORTED_MODEL_TYPES = ('qwen3_5', 'qwen3_5_text')
LINEAR_ATTENTION = 'linear_attention'
FULL_ATTENTION = 'full_attention'
CHUNK_SIZE = 64  # tokens per chunk of the chunked delta rule (transformers' default)
L2NORM_EPS = 1e-6  # eps of the q/k L2 normalization inside the delta rule (FLA's value)
WRAPPER_PREFIX = 'model.language_model.'  # weights of the vision-language checkpoints
IGNORED_PREFIXES = ('mtp.', 'model.visual.')  # multi-token prediction head, vision tower


def text_config(hf_config: dict) -> dict:
    """Return the text model's config: the wrapper's ``text_config``, or the config itself."""
    return hf_config.get('text_config') or hf_config


@dataclass(frozen=True)
class Qwen35Config:
    """Architecture hyper-parameters, read once from a Hugging Face ``config.json`` dict."""

    model_type: str
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    # informational: as transformers 5.24, the head is the checkpoint's lm_head.weight when it
    # has one, else the embedding
    tie_word_embeddings: bool
    attention_bias: bool
    conv_kernel_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    # The whole source config (the wrapper included), kept as canonical JSON so RoPE is
    # computed by the reference implementation (transformers) and the fingerprint covers
    # every field.
    hf_config_json: str = field(repr=False)

    def __post_init__(self):
        """Validate what the forward pass relies on."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidArgumentError(
                f'model_type {self.model_type!r} is not a Qwen3.5 dense model; '
                f'supported: {", ".join(SUPPORTED_MODEL_TYPES)}')
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f'num_attention_heads ({self.num_heads}) must be a multiple of '
                f'num_key_value_heads ({self.num_kv_heads})')
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise InvalidArgumentError(
                f'linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple '
                f'of linear_num_key_heads ({self.linear_num_key_heads})')
        if len(self.layer_types) != self.num_layers:
            raise InvalidArgumentError(
                f'layer_types has {len(self.layer_types)} entries for {self.num_layers} layers')
        unknown = set(self.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION}
        if unknown:
            raise InvalidArgumentError(
                f'unsupported layer_types {sorted(unknown)}; supported: '
                f'{LINEAR_ATTENTION}, {FULL_ATTENTION}')

    @property
    def key_dim(self) -> int:
        """Return the linear-attention query (and key) width: key heads x key head dim."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        """Return the linear-attention value width: value heads x value head dim."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Return the causal conv's channel count: the concatenated q, k and v."""
        return 2 * self.key_dim + self.value_dim

    @property
    def num_linear_layers(self) -> int:
        """Count the Gated DeltaNet layers (the ``conv`` and ``recurrent`` buffers' first axis)."""
        return self.layer_types.count(LINEAR_ATTENTION)

    @property
    def num_full_layers(self) -> int:
        """Count the full-attention layers (the ``kv`` buffer's first axis)."""
        return self.layer_types.count(FULL_ATTENTION)

    @classmethod
    def from_hf(cls, hf_config: dict) -> 'Qwen35Config':
        """
        Build from a Hugging Face config dict (as in ``config.json``).

        Accepts the text model (``qwen3_5_text``) and the vision-language wrapper (``qwen3_5``,
        whose ``text_config`` is the text model). Defaults for absent keys are transformers'
        own (``Qwen3_5TextConfig``), so the two read a config the same way.
        """
        model_type = hf_config.get('model_type', '')
        if model_type not in SUPPORTED_MODEL_TYPES:
            is_moe = 'moe' in model_type or model_type == 'qwen3_next'
            hint = ' (Mixture-of-Experts variants are not supported)' if is_moe else ''
            raise InvalidArgumentError(
                f'model_type {model_type!r} is not a Qwen3.5 dense model{hint}; '
                f'supported: {", ".join(SUPPORTED_MODEL_TYPES)}')
        text = text_config(hf_config)
        text_type = text.get('model_type', 'qwen3_5_text')
        if text_type != 'qwen3_5_text':
            raise InvalidArgumentError(
                f'text_config.model_type {text_type!r} is not qwen3_5_text')
        if text.get('num_experts') or text.get('num_experts_per_tok'):
            raise InvalidArgumentError(
                'Qwen3.5 Mixture-of-Experts configs (num_experts > 0) are not supported; '
                'use a dense Qwen3.5 checkpoint')
        if text.get('attn_output_gate') is False:
            raise InvalidArgumentError(
                'attn_output_gate false is not supported: Qwen3.5 attention gates its output')
        unknown = set(text.get('layer_types') or ()) - {LINEAR_ATTENTION, FULL_ATTENTION}
        if unknown:  # checked here: transformers' config silently rewrites unknown kinds
            raise InvalidArgumentError(
                f'unsupported layer_types {sorted(unknown)}; supported: '
                f'{LINEAR_ATTENTION}, {FULL_ATTENTION}')
        reference = _reference_config(text)
        if reference.hidden_act != 'silu':
            raise InvalidArgumentError(
                f'hidden_act {reference.hidden_act!r} is not supported; Qwen3.5 uses silu')
        tie = text.get('tie_word_embeddings', False)
        if text is not hf_config:  # the wrapper decides on tying for the whole checkpoint
            tie = hf_config.get('tie_word_embeddings', tie)
        return cls(
            model_type=model_type,
            vocab_size=reference.vocab_size,
            max_position_embeddings=reference.max_position_embeddings,
            num_layers=reference.num_hidden_layers,
            hidden_size=reference.hidden_size,
            intermediate_size=reference.intermediate_size,
            layer_types=tuple(reference.layer_types),
            num_heads=reference.num_attention_heads,
            num_kv_heads=reference.num_key_value_heads,
            head_dim=reference.head_dim,
            rms_norm_eps=reference.rms_norm_eps,
            tie_word_embeddings=bool(tie),
            attention_bias=bool(reference.attention_bias),
            conv_kernel_size=reference.linear_conv_kernel_dim,
            linear_num_key_heads=reference.linear_num_key_heads,
            linear_num_value_heads=reference.linear_num_value_heads,
            linear_key_head_dim=reference.linear_key_head_dim,
            linear_value_head_dim=reference.linear_value_head_dim,
            hf_config_json=json.dumps(hf_config, sort_keys=True, default=str),
        )


def _reference_config(text: dict):
    """Return transformers' ``Qwen3_5TextConfig`` for a text config dict."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model('qwen3_5_text', **{
            key: value for key, value in text.items() if key != 'model_type'})
    except Exception as error:  # transformers' and huggingface_hub's validation errors
        raise InvalidArgumentError(f'invalid Qwen3.5 text config: {error}') from error


def rope_tables(config: Qwen35Config, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Return fp32 ``cos, sin`` tables of shape ``[max_seq_len, rotary_dim]``.

    ``rotary_dim`` is ``head_dim * partial_rotary_factor``: RoPE rotates only the first dims of
    each head. The inverse frequencies and the attention scaling come from transformers' own
    ``Qwen3_5TextRotaryEmbedding`` (default, linear, yarn, ...). Its multimodal RoPE takes the
    temporal, height and width frequencies from three position rows (interleaved sections);
    for text the three rows are the token position, so every section sees the same angle and
    the table is plain 1-D RoPE. Dynamic scalings change the frequencies with the sequence
    length and are refused: a static buffer cannot follow them.
    """
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    reference = _reference_config(text_config(json.loads(config.hf_config_json)))
    rope_type = (reference.rope_parameters or {}).get('rope_type', 'default')
    if rope_type in ('dynamic', 'longrope'):
        raise InvalidArgumentError(
            f'{rope_type} RoPE scaling is not supported (static buffers)')
    rotary = Qwen3_5TextRotaryEmbedding(reference)
    positions = torch.arange(max_seq_len, dtype=torch.float)
    freqs = positions[:, None] * rotary.inv_freq.float()[None, :]  # [T, rotary_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
    return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling


def causal_conv(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    Depthwise causal conv of the last S columns of ``window``; returns fp32 [C, S].

    window: [C, K + S], the K inputs before the S new ones then the new ones (model dtype);
    weight: [C, K] fp32. Output column t is ``sum_j weight[:, j] * window[:, t + 1 + j]``,
    accumulated in fp32 (transformers' depthwise ``conv1d`` gives the same values). K
    multiply-adds over [C, S]: on CPU about as fast as oneDNN's bf16 depthwise conv and
    several times faster than its fp32 one at these shapes.
    """
    kernel = weight.shape[-1]
    num_tokens = window.shape[-1] - kernel
    window = window.float()
    if num_tokens == 1:
        return (window[:, 1:] * weight).sum(dim=-1, keepdim=True)  # [C, 1]
    out = window[:, 1:num_tokens + 1] * weight[:, :1]  # [C, S]
    for tap in range(1, kernel):
        out.addcmul_(window[:, tap + 1:tap + 1 + num_tokens], weight[:, tap:tap + 1])
    return out


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Return ``x / sqrt(sum(x^2) + eps)`` over the last axis, as FLA and transformers do."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           decay: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                           chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Run the gated delta rule over S tokens in chunks; return (output, final state).

    query, key: [H, S, dk] fp32, L2-normalized, query already scaled by ``dk ** -0.5``;
    value: [H, S, dv] fp32; decay (log space, <= 0) and beta: [H, S] fp32; state: the initial
    state [H, dk, dv] fp32 (not modified). Per token: ``state = state * exp(decay)``, then
    ``state += k (beta (v - k^T state))^T`` and ``out = q^T state``. Within a chunk the updates
    are folded into a few matmuls (the UT transform, as transformers'
    ``torch_chunk_gated_delta_rule``); only the chunks are a sequential loop.
    Returns output [H, S, dv] and the state after the last token [H, dk, dv], both fp32.
    """
    num_heads, num_tokens, _ = key.shape
    # pad to whole chunks: padded tokens have k = v = beta = 0 and decay 0, so they change
    # nothing
    pad = (-num_tokens) % chunk_size
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    decay, beta = (F.pad(x, (0, pad)) for x in (decay, beta))
    num_chunks = (num_tokens + pad) // chunk_size

    v_beta = value * beta[..., None]  # [H, S', dv]
    k_beta = key * beta[..., None]  # [H, S', dk]
    # [H, N, C, d]: chunk axis N, position in chunk C
    query, key, k_beta, v_beta = (
        x.reshape(num_heads, num_chunks, chunk_size, -1) for x in (query, key, k_beta, v_beta))
    cum_decay = decay.reshape(num_heads, num_chunks, chunk_size).cumsum(dim=-1)  # [H, N, C]
    strictly_upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool,
                                device=query.device).triu(1)
    # [H, N, C, C]: decay accumulated from position j to position i of a chunk (i >= j)
    pairwise_decay = (cum_decay[..., :, None] - cum_decay[..., None, :]).masked_fill(
        strictly_upper, float('-inf')).exp()
    ut_system = (k_beta @ key.transpose(-1, -2)) * pairwise_decay  # [H, N, C, C]
    intra_chunk = (query @ key.transpose(-1, -2)) * pairwise_decay  # [H, N, C, C]
    decayed_k_beta = k_beta * cum_decay.exp()[..., None]  # [H, N, C, dk]
    # (I + strictly_lower(ut_system))^-1 applied to v_beta and decayed_k_beta
    new_values = torch.linalg.solve_triangular(
        ut_system, v_beta, upper=False, unitriangular=True)  # [H, N, C, dv]
    k_cumdecay = torch.linalg.solve_triangular(
        ut_system, decayed_k_beta, upper=False, unitriangular=True)  # [H, N, C, dk]
    query = query * cum_decay.exp()[..., None]
    key = key * (cum_decay[..., -1:] - cum_decay).exp()[..., None]
    chunk_decay = cum_decay[..., -1].exp()[..., None, None]  # [H, N, 1, 1]

    output = torch.empty_like(new_values)  # [H, N, C, dv]
    for chunk in range(num_chunks):
        # the chunk's values less what the state before the chunk already predicts
        v_new = new_values[:, chunk] - k_cumdecay[:, chunk] @ state  # [H, C, dv]
        output[:, chunk] = query[:, chunk] @ state + intra_chunk[:, chunk] @ v_new
        state = state * chunk_decay[:, chunk] + key[:, chunk].transpose(-1, -2) @ v_new
    return output.reshape(num_heads, -1, output.shape[-1])[:, :num_tokens], state


def recurrent_gated_delta_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               decay: torch.Tensor, beta: torch.Tensor,
                               state: torch.Tensor | None, out_state: torch.Tensor
                               ) -> torch.Tensor:
    """
    Advance the gated delta rule by one token; write the new state into ``out_state``.

    query, key: [H, dk] fp32, L2-normalized, query scaled; value: [H, dv] fp32; decay, beta:
    [H] fp32; state: [H, dk, dv] fp32 or None for zeros; out_state: [H, dk, dv] fp32, may be
    ``state`` itself. The math and the reductions of transformers'
    ``torch_recurrent_gated_delta_rule`` (elementwise products summed over dk), in place and
    without a loop over heads. Returns the output [H, dv] fp32.
    """
    if state is None:
        out_state.zero_()
    else:
        torch.mul(state, decay.exp()[:, None, None], out=out_state)
    remembered = (out_state * key[:, :, None]).sum(dim=-2)  # [H, dv]: k^T state
    delta = (value - remembered) * beta[:, None]  # [H, dv]
    out_state.addcmul_(key[:, :, None], delta[:, None, :])  # state += k delta^T
    return (out_state * query[:, :, None]).sum(dim=-2)  # [H, dv]: q^T state


class CheckpointWeights:
    """Source weights by text-model name, read in fp32 (to fuse and prepare) or in the dtype."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device):
        # the vision-language checkpoint's names map onto the text model's; vision and MTP
        # weights are dropped (the MTP head reads its own)
        self.weights = {}
        for name, tensor in weights.items():
            if name.startswith(WRAPPER_PREFIX):
                self.weights['model.' + name[len(WRAPPER_PREFIX):]] = tensor
            elif not name.startswith(IGNORED_PREFIXES):
                self.weights[name] = tensor
        self.names = set(self.weights)
        self.dtype = dtype
        self.device = device

    def source(self, name: str) -> torch.Tensor:
        """
        Return a fresh fp32 copy on the device, to fuse and prepare by ``LinearFactory``.

        Always a copy, never the loaded tensor itself: one-row matmuls (decode) round
        differently depending on the weights' memory alignment, which a checkpoint file's
        layout would otherwise decide.
        """
        return self.weights[name].to(device=self.device, dtype=torch.float32, copy=True)

    def take(self, name: str) -> torch.Tensor:
        """Return it in the model dtype on the device, as transformers holds the parameter."""
        return self.weights[name].to(device=self.device, dtype=self.dtype).contiguous()

    def optional(self, name: str) -> torch.Tensor | None:
        """Return ``take(name)``, or None when the checkpoint has no such weight (biases)."""
        return self.take(name) if name in self.names else None

    def norm_scale(self, name: str) -> torch.Tensor:
        """Return ``1 + w`` in fp32 from ``w`` rounded to the model dtype (``Qwen3_5RMSNorm``)."""
        return 1.0 + self.take(name).float()


class Qwen35Model:
    """Weights plus a forward pass over one slot's ``kv``, ``conv`` and ``recurrent`` buffers."""

    family = 'qwen3_5'

    def __init__(self, config: Qwen35Config, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device, max_seq_len: int,
                 quantization: str = 'none'):
        """
        Take Hugging Face-named weights, fuse projections, move to dtype and device.

        Both namings load: the text model's ``model.*`` and the vision-language checkpoint's
        ``model.language_model.*`` (its ``model.visual.*`` is ignored; ``mtp.*`` is the MTP head,
        which ``capsule_ros.runtime.models.mtp`` loads).
        ``quantization`` as in ``LinearFactory`` (``none``, ``int4``, ``auto``).
        """
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_seq_len = max_seq_len
        self.linears = LinearFactory(dtype, device, quantization)
        weights = CheckpointWeights(weights, dtype, device)
        source, norm_scale = weights.source, weights.norm_scale
        prepare = self.linears.prepare
        self.embed_tokens = weights.take('model.embed_tokens.weight')  # [V, D]
        self.final_norm = norm_scale('model.norm.weight')  # [D] fp32
        # As transformers 5.24 loads it: a checkpoint's lm_head.weight is the head even under
        # tie_word_embeddings (it warns and does not tie when the two differ); without one the
        # head is the embedding. The head stays dense (as in the Llama family).
        head = 'lm_head.weight'
        if head not in weights.names:
            head = 'model.embed_tokens.weight'
        self.lm_head = prepare(source(head), quantize=False)  # [V, D]

        head_dim = config.head_dim
        self.q_size = config.num_heads * head_dim
        self.kv_size = config.num_kv_heads * head_dim
        self.group_size = config.num_heads // config.num_kv_heads
        self.qk_heads = config.num_heads + config.num_kv_heads
        self.value_group = config.linear_num_value_heads // config.linear_num_key_heads
        # in_proj output columns: [q k v (conv input) | z (output gate) | b (beta) | a (decay)]
        self.in_proj_sizes = (config.conv_dim, config.value_dim,
                              config.linear_num_value_heads, config.linear_num_value_heads)
        self.layers = []
        ordinals = {LINEAR_ATTENTION: 0, FULL_ATTENTION: 0}
        for index, layer_type in enumerate(config.layer_types):
            self.layers.append(self._layer_weights(weights, f'model.layers.{index}.',
                                                   layer_type, ordinals[layer_type]))
            ordinals[layer_type] += 1

        cos, sin = rope_tables(config, max_seq_len)
        self.rotary_dim = cos.shape[-1]
        half = self.rotary_dim // 2
        self.rope_cos = cos.to(device=device, dtype=dtype)  # [T, R]
        # rotate_half(x) * sin == roll(x, R / 2) * [-sin_1, sin_2]: one op instead of four
        self.rope_sin_signed = torch.cat(
            (-sin[:, :half], sin[:, half:]), dim=-1).to(device=device, dtype=dtype)  # [T, R]

    def _layer_weights(self, weights: CheckpointWeights, prefix: str, layer_type: str,
                       ordinal: int) -> dict:
        """Prepare decoder layer ``prefix*``; ``ordinal`` indexes its type's state buffer."""
        source, norm_scale = weights.source, weights.norm_scale
        mlp = prefix + 'mlp.'
        layer = {
            'type': layer_type,
            'ordinal': ordinal,
            'input_norm': norm_scale(prefix + 'input_layernorm.weight'),  # [D] fp32
            'post_attention_norm': norm_scale(prefix + 'post_attention_layernorm.weight'),
            # [2 I, D]: one matmul for gate and up
            'gate_up': self.linears.prepare(torch.cat([source(mlp + 'gate_proj.weight'),
                                                       source(mlp + 'up_proj.weight')])),
            'down': self.linears.prepare(source(mlp + 'down_proj.weight')),  # [D, I]
        }
        if layer_type == LINEAR_ATTENTION:
            layer.update(self._linear_attention_weights(prefix + 'linear_attn.', weights))
        else:
            layer.update(self._full_attention_weights(prefix + 'self_attn.', weights))
        return layer

    def attention_layer_weights(self, weights: dict[str, torch.Tensor], prefix: str) -> dict:
        """Prepare a full-attention decoder layer ``prefix*`` outside the stack (an MTP block)."""
        return self._layer_weights(CheckpointWeights(weights, self.dtype, self.device), prefix,
                                   FULL_ATTENTION, 0)

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the scale ``_rms_norm`` applies for a norm weight: ``1 + w`` in fp32."""
        return 1.0 + weight.to(device=self.device, dtype=self.dtype).float()

    def block_forward(self, layer: dict, x: torch.Tensor, start_pos: int, kv: torch.Tensor,
                      first_key: int = 0) -> torch.Tensor:
        """
        One full-attention layer over x [S, D] at ``start_pos``, writing kv [2, Hkv, T, hd].

        Keys from ``first_key`` on are attended (an MTP head's cache starts at position 1).
        """
        end_pos = start_pos + x.shape[0]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, R]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, R]
        h = self._rms_norm(x, layer['input_norm'])
        x = x + self._full_attention(h, layer, start_pos, kv[None], cos, sin_signed, first_key)
        return self._feed_forward(layer, x)

    def _feed_forward(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        h = self._rms_norm(x, layer['post_attention_norm'])
        gate, up = self.linears.apply(h, layer['gate_up']).chunk(2, dim=-1)  # [S, I]
        return x + self.linears.apply(F.silu(gate) * up, layer['down'])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Fp32 logits [S, V] of final-normed hidden states [S, D] (the shared output head)."""
        return self.linears.apply(normed, self.lm_head).float()

    def _linear_attention_weights(self, prefix: str, weights: CheckpointWeights) -> dict:
        """Prepare one Gated DeltaNet layer: fused input projection, conv, decay, norm, out."""
        config = self.config
        source, take = weights.source, weights.take
        return {
            # [C + Dv + 2 Hv, D]: one matmul for the conv input (q, k, v), z, b and a
            'in_proj': self.linears.prepare(torch.cat([
                source(prefix + f'in_proj_{part}.weight') for part in ('qkv', 'z', 'b', 'a')])),
            # [C, K] fp32 (from the model dtype): depthwise causal conv, one filter per channel
            'conv_weight': take(prefix + 'conv1d.weight').float().reshape(
                config.conv_dim, config.conv_kernel_size),
            'conv_bias': weights.optional(prefix + 'conv1d.bias'),  # [C] or None
            # [Hv] fp32: decay = -exp(A_log) * softplus(a + dt_bias), with both parameters
            # rounded to the model dtype first, as transformers holds them
            'neg_decay_rate': -take(prefix + 'A_log').float().exp(),
            'dt_bias': take(prefix + 'dt_bias'),
            'norm': take(prefix + 'norm.weight'),  # [dv]: gated RMSNorm, plain weight
            'out_proj': self.linears.prepare(source(prefix + 'out_proj.weight')),  # [D, Dv]
        }

    def _full_attention_weights(self, prefix: str, weights: CheckpointWeights) -> dict:
        """Prepare one gated attention layer: q/k/v/gate in one matmul, q/k norms, output."""
        config = self.config
        source, take = weights.source, weights.take
        head_dim = config.head_dim
        # q_proj holds, per head, the query then the output gate: [H, 2, hd, D]
        q_gate = source(prefix + 'q_proj.weight').reshape(config.num_heads, 2, head_dim, -1)
        query, gate = q_gate[:, 0].flatten(0, 1), q_gate[:, 1].flatten(0, 1)  # [H hd, D]
        weight = torch.cat([query, source(prefix + 'k_proj.weight'),
                            source(prefix + 'v_proj.weight'), gate])  # [2 H hd + 2 Hkv hd, D]
        bias = None
        if config.attention_bias:
            q_gate_bias = source(prefix + 'q_proj.bias').reshape(config.num_heads, 2, head_dim)
            bias = torch.cat([q_gate_bias[:, 0].flatten(), source(prefix + 'k_proj.bias'),
                              source(prefix + 'v_proj.bias'), q_gate_bias[:, 1].flatten()])
        return {
            # [(H + Hkv) hd, D] rows in the order [q | k | v | gate]: q and k are neighbours
            'qkvg': self.linears.prepare(weight, bias),
            'o': self.linears.prepare(
                source(prefix + 'o_proj.weight'),
                weights.optional(prefix + 'o_proj.bias')),  # [D, H hd]
            # [H + Hkv, 1, hd] fp32: (1 + q_norm) for the query heads, (1 + k_norm) for keys
            'qk_norm': torch.cat([
                1.0 + take(prefix + 'q_norm.weight').float().expand(config.num_heads, -1),
                1.0 + take(prefix + 'k_norm.weight').float().expand(config.num_kv_heads, -1),
            ])[:, None],
        }

    @property
    def weights_format(self) -> str:
        """Describe the weights decode runs on (part of the fingerprint); not the mode asked."""
        return self.linears.describe()

    def state_specs(self) -> list[BufferSpec]:
        """Name every live buffer a session slot needs for this architecture."""
        config = self.config
        return [
            # kv: [L_full, 2 (k, v), Hkv, T, hd], valid along axis 3 up to the position
            BufferSpec('kv', StateKind.KV,
                       (config.num_full_layers, 2, config.num_kv_heads, self.max_seq_len,
                        config.head_dim), self.dtype, seq_axis=3),
            # conv: [L_linear, C, K], the last K conv inputs (q, k, v before the conv)
            BufferSpec('conv', StateKind.CONV,
                       (config.num_linear_layers, config.conv_dim, config.conv_kernel_size),
                       self.dtype),
            # recurrent: [L_linear, Hv, dk, dv], the delta-rule state, fp32 in every dtype
            BufferSpec('recurrent', StateKind.RECURRENT,
                       (config.num_linear_layers, config.linear_num_value_heads,
                        config.linear_key_head_dim, config.linear_value_head_dim),
                       torch.float32),
        ]

    def _rms_norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # transformers' Qwen3_5RMSNorm: statistics and the (1 + w) scale in fp32, then dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps)
        return (normed * scale).to(x.dtype)

    def _gated_rms_norm(self, x: torch.Tensor, gate: torch.Tensor,
                        weight: torch.Tensor) -> torch.Tensor:
        # transformers' Qwen3_5RMSNormGated: normalize in fp32, scale in dtype, gate in fp32
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps)
        return (weight * normed.to(x.dtype) * F.silu(gate.float())).to(x.dtype)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start_pos: int, state: dict[str, torch.Tensor],
                all_logits: bool = False,
                out_state: dict[str, torch.Tensor] | None = None,
                return_hidden: bool = False):
        """
        Run tokens at positions ``[start_pos, start_pos + S)``.

        token_ids: [S] int64. ``state['kv']`` is written in place at those positions.
        ``conv``/``recurrent`` are read from ``state`` and written into ``out_state`` (default
        ``state``); every element of the out buffers is written, and a distinct ``out_state``
        leaves ``state``'s untouched. At ``start_pos == 0`` the incoming ``conv``/``recurrent``
        are ignored (zeros). Returns fp32 logits [S, V] when ``all_logits`` else [V] for the
        last token; with ``return_hidden`` also the final-normed hidden states [S, D] (the MTP
        head's input).
        """
        num_tokens = token_ids.shape[0]
        end_pos = start_pos + num_tokens
        if end_pos > self.max_seq_len:
            raise InvalidArgumentError(
                f'positions up to {end_pos} exceed max_seq_len {self.max_seq_len}')
        out_state = state if out_state is None else out_state
        x = self.embed_tokens[token_ids]  # [S, D]
        cos = self.rope_cos[start_pos:end_pos][None]  # [1, S, R]
        sin_signed = self.rope_sin_signed[start_pos:end_pos][None]  # [1, S, R]
        for layer in self.layers:
            h = self._rms_norm(x, layer['input_norm'])
            if layer['type'] == LINEAR_ATTENTION:
                x = x + self._linear_attention(h, layer, start_pos, state, out_state)
            else:
                x = x + self._full_attention(h, layer, start_pos, state['kv'], cos, sin_signed)
            x = self._feed_forward(layer, x)
        return final_logits(self, x, all_logits, return_hidden)

    def _linear_attention(self, h: torch.Tensor, layer: dict, start_pos: int,
                          state: dict[str, torch.Tensor],
                          out_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gated DeltaNet mixer for h [S, D]; returns [S, D]."""
        config = self.config
        num_tokens = h.shape[0]
        ordinal = layer['ordinal']
        kernel = config.conv_kernel_size
        num_value_heads = config.linear_num_value_heads
        mixed_qkv, z, b, a = self.linears.apply(h, layer['in_proj']).split(
            self.in_proj_sizes, dim=-1)  # [S, C], [S, Dv], [S, Hv], [S, Hv]

        # causal depthwise conv: each token sees itself and the K - 1 inputs before it
        if start_pos == 0:
            previous = torch.zeros(config.conv_dim, kernel, dtype=self.dtype,
                                   device=self.device)
        else:
            previous = state['conv'][ordinal]  # [C, K]
        window = torch.cat((previous, mixed_qkv.transpose(0, 1)), dim=-1)  # [C, K + S]
        out_state['conv'][ordinal] = window[:, -kernel:]
        conv = causal_conv(window, layer['conv_weight']).to(self.dtype)  # [C, S]
        if layer['conv_bias'] is not None:
            conv = conv + layer['conv_bias'][:, None]
        mixed_qkv = F.silu(conv).transpose(0, 1)  # [S, C]

        query, key, value = mixed_qkv.split((config.key_dim, config.key_dim, config.value_dim),
                                            dim=-1)
        # [Hv, S, d] fp32; each key head serves value_group consecutive value heads
        query, key = (
            x.reshape(num_tokens, config.linear_num_key_heads, -1)
            .repeat_interleave(self.value_group, dim=1).transpose(0, 1).float()
            for x in (query, key))
        query, key = l2_normalize(query), l2_normalize(key)
        value = value.reshape(num_tokens, num_value_heads, -1).transpose(0, 1).float()
        beta = b.sigmoid().transpose(0, 1).float()  # [Hv, S]
        # log-space decay <= 0: the state is multiplied by exp(decay) at each token
        decay = (layer['neg_decay_rate'] * F.softplus(a.float() + layer['dt_bias'])
                 ).transpose(0, 1)  # [Hv, S] fp32
        out_recurrent = out_state['recurrent'][ordinal]  # [Hv, dk, dv] fp32
        incoming = None if start_pos == 0 else state['recurrent'][ordinal]
        if num_tokens == 1:
            # transformers divides by sqrt(dk) here and multiplies by dk^-0.5 in the chunked
            # rule; each path keeps its rounding
            query = query / (query.shape[-1] ** 0.5)
            core = recurrent_gated_delta_step(
                query[:, 0], key[:, 0], value[:, 0], decay[:, 0], beta[:, 0], incoming,
                out_recurrent)[None]  # [1, Hv, dv]
        else:
            query = query * query.shape[-1] ** -0.5
            if incoming is None:
                incoming = torch.zeros_like(out_recurrent)
            core, final = chunk_gated_delta_rule(query, key, value, decay, beta, incoming)
            out_recurrent.copy_(final)
            core = core.transpose(0, 1)  # [S, Hv, dv]
        core = self._gated_rms_norm(core.to(self.dtype), z.reshape(core.shape), layer['norm'])
        return self.linears.apply(core.reshape(num_tokens, config.value_dim), layer['out_proj'])

    def _full_attention(self, h: torch.Tensor, layer: dict, start_pos: int, kv: torch.Tensor,
                        cos: torch.Tensor, sin_signed: torch.Tensor,
                        first_key: int = 0) -> torch.Tensor:
        """
        Gated GQA attention for h [S, D] at start_pos, writing kv in place; returns [S, D].

        Keys from ``first_key`` on are attended (an MTP head's cache starts at position 1).
        """
        config = self.config
        num_tokens = h.shape[0]
        end_pos = start_pos + num_tokens
        head_dim = config.head_dim
        index = layer['ordinal']
        qkvg = self.linears.apply(h, layer['qkvg'])  # [S, 2 H hd + 2 Hkv hd]
        # q and k are neighbours in qkvg: normalize and rotate them as one tensor
        qk = qkvg[:, :self.q_size + self.kv_size].view(
            num_tokens, self.qk_heads, head_dim).transpose(0, 1)  # [H + Hkv, S, hd]
        v = qkvg[:, self.q_size + self.kv_size:self.q_size + 2 * self.kv_size].view(
            num_tokens, config.num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, S, hd]
        gate = qkvg[:, self.q_size + 2 * self.kv_size:]  # [S, H hd]
        qk = self._rms_norm(qk, layer['qk_norm'])
        # partial RoPE: rotate the first R dims of each head, pass the rest through
        rotary = qk[..., :self.rotary_dim]
        qk = torch.cat((rotary * cos + rotary.roll(self.rotary_dim // 2, dims=-1) * sin_signed,
                        qk[..., self.rotary_dim:]), dim=-1)
        q, k = qk.split((config.num_heads, config.num_kv_heads))  # [H | Hkv, S, hd]
        kv[index, 0, :, start_pos:end_pos] = k
        kv[index, 1, :, start_pos:end_pos] = v
        keys = kv[index, 0, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        values = kv[index, 1, :, first_key:end_pos]  # [Hkv, end - first_key, hd]
        if num_tokens == 1:
            # decode: the g query heads sharing a KV head act as g queries of one batch
            # entry, which is faster than broadcasting KV to all heads; 4-D inputs take the
            # fused (flash) CPU kernel
            grouped = q.reshape(1, config.num_kv_heads, self.group_size, head_dim)
            attention = F.scaled_dot_product_attention(grouped, keys[None], values[None])
            attention = attention.reshape(1, self.q_size)  # [1, H hd]
        else:
            attn_mask, is_causal = causal_mask(start_pos, end_pos, first_key, self.device)
            attention = F.scaled_dot_product_attention(
                q[None], keys[None], values[None], attn_mask=attn_mask,
                is_causal=is_causal, enable_gqa=True)  # [1, H, S, hd]
            attention = attention[0].transpose(0, 1).reshape(num_tokens, self.q_size)
        return self.linears.apply(attention * torch.sigmoid(gate), layer['o'])
