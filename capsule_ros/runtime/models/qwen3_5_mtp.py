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
Qwen3.5's multi-token-prediction (MTP) head: the numerics, checked against transformers.

DeepSeek-V3 style, as transformers 5.x's generic ``MtpLayer`` computes it: for the token at
position p and the main model's final (normed) hidden state at position p - 1,

    x = fc([pre_fc_norm_embedding(embed(token)); pre_fc_norm_hidden(hidden)])   [S, 2D] -> [S, D]
    x = decoder_layer(x)       one gated full-attention layer with its own KV cache
    out = norm(x)              the hidden state a chained step feeds back in
    logits = lm_head(out)      the main model's head, shared

which predicts the token at p + 1. Qwen3.5 checkpoints name the parts ``mtp.fc``,
``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*`` and ``mtp.norm``;
transformers' ``MtpLayer`` calls them ``eh_proj``, ``enorm``, ``hnorm``, ``mtp_block`` and
``post_norm`` (``test_qwen3_5_mtp.py`` holds the mapping and the parity). Every norm is a
``Qwen3_5RMSNorm`` (scale ``1 + w``).

The head's KV cache is indexed by absolute position, like the main model's, and starts at
position 1 (position 0 has no previous hidden state): a slot buffer ``[1, 2, Hkv, T, hd]``
valid for positions ``[1, position)``. Not wired into the engine yet: drafting with it
(``generation.speculative: mtp``) and its state in the StateLayout come next.
"""

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models.qwen3_5 import CheckpointWeights
from capsule_ros.runtime.models.qwen3_5 import FULL_ATTENTION, Qwen35Model
from capsule_ros.runtime.state import BufferSpec, StateKind
import torch
import torch.nn.functional as F  # noqa: N812

PREFIX = 'mtp.'


def has_mtp_head(weights: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint carries an MTP head (``mtp.*`` tensors)."""
    return any(name.startswith(PREFIX) for name in weights)


class Qwen35MtpHead:
    """One MTP layer over a loaded ``Qwen35Model`` (its embedding, head and RoPE are shared)."""

    def __init__(self, model: Qwen35Model, weights: dict[str, torch.Tensor]):
        """Prepare the ``mtp.*`` weights of a Qwen3.5 checkpoint for ``model``."""
        layers = {name.split('.')[2] for name in weights if name.startswith(PREFIX + 'layers.')}
        if layers != {'0'}:
            raise InvalidArgumentError(
                f'the MTP head must have exactly one layer (mtp.layers.0); found '
                f'{sorted(layers) or "none"}')
        self.model = model
        linears = model.linears
        # the head's weights by their names under mtp., read as the main model reads its own
        head = CheckpointWeights({name[len(PREFIX):]: tensor
                                  for name, tensor in weights.items() if name.startswith(PREFIX)},
                                 model.dtype, model.device)
        self.embedding_norm = head.norm_scale('pre_fc_norm_embedding.weight')  # [D] fp32
        self.hidden_norm = head.norm_scale('pre_fc_norm_hidden.weight')  # [D] fp32
        self.fc = linears.prepare(head.source('fc.weight'), quantize=False)  # [D, 2D]
        self.output_norm = head.norm_scale('norm.weight')  # [D] fp32
        layer, mlp = 'layers.0.', 'layers.0.mlp.'
        self.layer = {
            'type': FULL_ATTENTION,
            'ordinal': 0,  # the head's own KV buffer holds this one layer
            'input_norm': head.norm_scale(layer + 'input_layernorm.weight'),
            'post_attention_norm': head.norm_scale(layer + 'post_attention_layernorm.weight'),
            'gate_up': linears.prepare(torch.cat([head.source(mlp + 'gate_proj.weight'),
                                                  head.source(mlp + 'up_proj.weight')])),
            'down': linears.prepare(head.source(mlp + 'down_proj.weight')),
        }
        self.layer.update(model._full_attention_weights(layer + 'self_attn.', head))

    def state_spec(self) -> BufferSpec:
        """Describe the head's KV buffer: [1, 2, Hkv, T, hd], valid from 1 to the position."""
        config = self.model.config
        return BufferSpec('mtp_kv', StateKind.MTP,
                          (1, 2, config.num_kv_heads, self.model.max_seq_len, config.head_dim),
                          self.model.dtype, seq_axis=3)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, hidden: torch.Tensor, start_pos: int,
                kv: torch.Tensor) -> torch.Tensor:
        """
        Run the head on tokens at positions ``[start_pos, start_pos + S)``, writing ``kv``.

        token_ids [S]; hidden [S, D]: the main model's final normed hidden states at the
        positions before them (``start_pos - 1`` onwards), or the head's own output when
        chaining. Returns the head's output hidden states [S, D] (``logits`` maps them).
        """
        model = self.model
        num_tokens = token_ids.shape[0]
        end_pos = start_pos + num_tokens
        if start_pos < 1 or end_pos > model.max_seq_len:
            raise InvalidArgumentError(
                f'MTP positions [{start_pos}, {end_pos}) must lie in [1, {model.max_seq_len})')
        embedded = model._rms_norm(model.embed_tokens[token_ids], self.embedding_norm)
        previous = model._rms_norm(hidden.to(model.dtype), self.hidden_norm)
        x = model.linears.apply(torch.cat([embedded, previous], dim=-1), self.fc)  # [S, D]
        cos = model.rope_cos[start_pos:end_pos][None]  # [1, S, R]
        sin_signed = model.rope_sin_signed[start_pos:end_pos][None]  # [1, S, R]
        layer = self.layer
        h = model._rms_norm(x, layer['input_norm'])
        x = x + model._full_attention(h, layer, start_pos, kv, cos, sin_signed, first_key=1)
        h = model._rms_norm(x, layer['post_attention_norm'])
        gate, up = model.linears.apply(h, layer['gate_up']).chunk(2, dim=-1)  # [S, I]
        x = x + model.linears.apply(F.silu(gate) * up, layer['down'])
        return model._rms_norm(x, self.output_norm)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Fp32 logits [S, V] of the head's output hidden states [S, D] (the shared head)."""
        return self.model.linears.apply(out, self.model.lm_head).float()
