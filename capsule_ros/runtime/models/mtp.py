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
The multi-token-prediction (MTP) head: one extra decoder block that drafts the token after next.

DeepSeek-V3 style, as transformers 5.x's generic ``MtpLayer`` computes it: for the token at
position p and the main model's final (normed) hidden state at position p - 1,

    x = fc([pre_fc_norm_embedding(embed(token)); pre_fc_norm_hidden(hidden)])   [S, 2D] -> [S, D]
    x = block(x)               one attention decoder layer of the family, with its own KV cache
    out = norm(x)              the hidden state a chained step feeds back in
    logits = lm_head(out)      the main model's head, shared

which predicts the token at p + 1. Qwen3.5 checkpoints carry the head as ``mtp.fc``,
``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*`` and ``mtp.norm``;
transformers' ``MtpLayer`` calls them ``eh_proj``, ``enorm``, ``hnorm``, ``mtp_block`` and
``post_norm`` (``test_qwen3_5_mtp.py`` holds the mapping and the parity). The same names load
a head for any family: ``mtp.layers.0.*`` is then an attention layer in the family's own
naming (``model.layers.N.*``) and the norms are the family's (Qwen3.5: scale ``1 + w``).

The head's KV cache is indexed by absolute position, like the main model's, and starts at
position 1 (position 0 has no previous hidden state): a slot buffer ``mtp_kv``
[1, 2, Hkv, T, hd] valid for positions ``[1, position)``, next to ``mtp_hidden`` [D], the main
model's last hidden state (see ``MtpState``).
"""

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.state import BufferSpec, StateKind
import torch

PREFIX = 'mtp.'
MTP_KV, MTP_HIDDEN = 'mtp_kv', 'mtp_hidden'  # the head's slot buffers


def has_mtp_head(weights: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint carries an MTP head (``mtp.*`` tensors)."""
    return any(name.startswith(PREFIX) for name in weights)


class MtpHead:
    """One MTP layer over a loaded model of any family (its embedding, head and RoPE shared)."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        """Prepare the ``mtp.*`` weights of a checkpoint for ``model``."""
        layers = {name.split('.')[2] for name in weights if name.startswith(PREFIX + 'layers.')}
        if layers != {'0'}:
            raise InvalidArgumentError(
                f'the MTP head must have exactly one layer (mtp.layers.0); found '
                f'{sorted(layers) or "none"}')
        self.model = model
        head = {name[len(PREFIX):]: tensor
                for name, tensor in weights.items() if name.startswith(PREFIX)}
        missing = sorted({'fc.weight', 'pre_fc_norm_embedding.weight',
                          'pre_fc_norm_hidden.weight', 'norm.weight'} - set(head))
        if missing:
            raise InvalidArgumentError(
                f'the MTP head lacks {", ".join(PREFIX + name for name in missing)}')
        self.embedding_norm = model.norm_weight(head['pre_fc_norm_embedding.weight'])  # [D]
        self.hidden_norm = model.norm_weight(head['pre_fc_norm_hidden.weight'])  # [D]
        # [D, 2D], dense: from a fresh fp32 copy, as the family prepares its own linears
        self.fc = model.linears.prepare(
            head['fc.weight'].to(device=model.device, dtype=torch.float32, copy=True),
            quantize=False)
        self.output_norm = model.norm_weight(head['norm.weight'])  # [D]
        self.block = model.attention_layer_weights(head, 'layers.0.')

    def state_specs(self) -> list[BufferSpec]:
        """Describe the head's slot buffers: its KV cache and the last hidden state."""
        model = self.model
        config = model.config
        return [
            # [1, 2, Hkv, T, hd], valid from position 1 to the session's position
            BufferSpec(MTP_KV, StateKind.MTP,
                       (1, 2, config.num_kv_heads, model.max_seq_len, config.head_dim),
                       model.dtype, seq_axis=3),
            # [D]: the final normed hidden state at position - 1 (what the next token pairs with)
            BufferSpec(MTP_HIDDEN, StateKind.MTP, (config.hidden_size,), model.dtype),
        ]

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, hidden: torch.Tensor, start_pos: int,
                kv: torch.Tensor) -> torch.Tensor:
        """
        Run the head on tokens at positions ``[start_pos, start_pos + S)``, writing ``kv``.

        token_ids [S]; hidden [S, D]: the main model's final normed hidden states at the
        positions before them (``start_pos - 1`` onwards), or the head's own output when
        chaining; kv: the ``mtp_kv`` buffer [1, 2, Hkv, T, hd]. Returns the head's output
        hidden states [S, D] (``logits`` maps them).
        """
        model = self.model
        end_pos = start_pos + token_ids.shape[0]
        if start_pos < 1 or end_pos > model.max_seq_len:
            raise InvalidArgumentError(
                f'MTP positions [{start_pos}, {end_pos}) must lie in [1, {model.max_seq_len})')
        embedded = model._rms_norm(model.embed_tokens[token_ids], self.embedding_norm)
        previous = model._rms_norm(hidden.to(model.dtype), self.hidden_norm)
        x = model.linears.apply(torch.cat([embedded, previous], dim=-1), self.fc)  # [S, D]
        x = model.block_forward(self.block, x, start_pos, kv[0], first_key=1)
        return model._rms_norm(x, self.output_norm)

    def advance(self, token_ids: torch.Tensor, hidden: torch.Tensor, start_pos: int,
                state: dict[str, torch.Tensor], out_state: dict[str, torch.Tensor]) -> None:
        """
        Keep the head's state in step with a main forward pass over ``[start_pos, + S)``.

        token_ids [S]; hidden [S, D]: that pass's final normed hidden states. Each token runs
        with the hidden state before it (the first with ``state['mtp_hidden']``; position 0
        has none and is skipped), so ``mtp_kv`` holds positions ``[1, start_pos + S)``; the
        last hidden state goes to ``out_state['mtp_hidden']``.
        """
        previous = torch.cat([state[MTP_HIDDEN][None].to(hidden.dtype), hidden[:-1]])  # [S, D]
        if start_pos == 0:
            token_ids, previous, start_pos = token_ids[1:], previous[1:], 1
        if token_ids.shape[0]:
            self.forward(token_ids, previous, start_pos, state[MTP_KV])
        out_state[MTP_HIDDEN].copy_(hidden[-1])

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Fp32 logits [S, V] of the head's output hidden states [S, D] (the shared head)."""
        return self.model.logits(out)
