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
What the compiled backends (ONNX Runtime, TensorRT) share: the graph and the bindings of a step.

Both run the graph of ``capsule_ros.runtime.export`` over the same slot buffers. Per step,
``StepBindings`` names every tensor the graph reads and writes: the slot's KV buffers by address
(``past_key_values_{i}``, nothing copied), fresh outputs for the new positions and the logits;
``finish`` writes the new positions into the slot at ``[start, start + S)``, the only state
write of a step. The backends differ only in how they hand addresses to their runtime.
"""

from dataclasses import dataclass
import json
from pathlib import Path

from capsule_ros.runtime import export
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models import registry
from capsule_ros.runtime.state import StateLayout
import torch


def prepare_graph(model_config, weights: dict, weights_sha256: str, dtype: torch.dtype,
                  max_seq_len: int, cache_dir, progress=None):
    """
    Build the dense torch model and return it with its (cached) exported step graph.

    The export runs on the CPU in ``dtype`` with dense weights; the returned model describes
    the state (``state_specs``) and the numerics the graph was traced from.
    """
    if dtype != torch.float32:
        raise InvalidArgumentError(
            f'parameter model.dtype: the compiled backends run the exported graph in float32 '
            f'here (got {dtype}); set model.dtype: float32')
    family = registry.family_of(json.loads(model_config.hf_config_json))
    if family not in export.EXPORTABLE_FAMILIES:  # refused before any weight is prepared
        raise InvalidArgumentError(
            f'parameter backend.kind: the compiled backends run the '
            f'{", ".join(export.EXPORTABLE_FAMILIES)} family so far; {family} runs on '
            f'backend.kind: torch')
    model = registry.build_model(model_config, weights, dtype, torch.device('cpu'),
                                 max_seq_len, 'none')
    layout = StateLayout(model.state_specs())
    path = export.cached_export(model, weights_sha256, layout, Path(cache_dir) / 'onnx',
                                progress)
    return model, layout, path


@dataclass
class StepBindings:
    """The tensors of one step, by binding name: inputs, and outputs allocated for the runtime."""

    tensors: dict[str, torch.Tensor]
    start_pos: int
    num_tokens: int
    all_logits: bool


class CompiledStepModel:
    """A model whose step is the exported graph; subclasses run it (``_run``)."""

    def __init__(self, model, layout: StateLayout, weights_format: str):
        """Keep what describes the model and its state (not the torch weights)."""
        self.family = model.family
        self.config = model.config
        self.dtype = model.dtype
        self.max_seq_len = model.max_seq_len
        self.weights_format = weights_format
        self._specs = model.state_specs()
        self.bindings = export.contract(layout, model.config.vocab_size)
        self.kv_layers = layout.by_name['kv'].shape[0]  # attention layers

    def state_specs(self):
        """Name every live buffer a session slot needs (the torch model's, unchanged)."""
        return list(self._specs)

    def bind(self, token_ids: torch.Tensor, start_pos: int, state: dict[str, torch.Tensor],
             all_logits: bool) -> StepBindings:
        """Name every tensor of a step over ``state``: the slot's KV by address, fresh outputs."""
        num_tokens = token_ids.shape[0]
        end_pos = start_pos + num_tokens
        if start_pos < 0 or end_pos > self.max_seq_len:
            raise InvalidArgumentError(
                f'positions [{start_pos}, {end_pos}) exceed max_seq_len {self.max_seq_len}')
        device = state['kv'].device
        kv = state['kv']  # [L, 2, Hkv, T, hd]
        rows = (torch.arange(num_tokens, device=device) if all_logits
                else torch.tensor([num_tokens - 1], device=device))
        tensors = {
            export.INPUT_IDS: token_ids.to(device=device, dtype=torch.int64).reshape(1, -1),
            export.START_INDEX: torch.tensor([start_pos], dtype=torch.int64, device=device),
            export.LAST_TOKEN_IDS: rows[None],
            export.LOGITS: torch.empty(1, rows.shape[0], self.config.vocab_size,
                                       dtype=torch.float32, device=device),
        }
        presents = torch.empty(kv.shape[0], 1, 2, kv.shape[2], num_tokens, kv.shape[4],
                               dtype=kv.dtype, device=device)  # [L, 1, 2, Hkv, S, hd]
        for layer in range(self.kv_layers):
            tensors[export.past_name(layer)] = kv[layer][None]  # the slot buffer itself
            tensors[export.present_name(layer)] = presents[layer]
        tensors['presents'] = presents
        if 'conv' in state:  # [Lc, D, K]: bound by address, the new state into a fresh one
            conv = state['conv']
            new_conv = torch.empty_like(conv)
            for layer in range(conv.shape[0]):
                tensors[export.conv_name(layer)] = conv[layer][None]
                tensors[export.present_conv_name(layer)] = new_conv[layer][None]
            tensors['new_conv'] = new_conv
        return StepBindings(tensors, start_pos, num_tokens, all_logits)

    @staticmethod
    def finish(step: StepBindings, state: dict[str, torch.Tensor],
               out_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Write the new positions into the slot and the new conv state into ``out_state``.

        The graph never writes an input (ONNX Runtime does not promise in-place aliasing), so
        the conv state comes out in a fresh buffer and is copied into the target (60 KiB for
        LFM2-350M), which is ``state``'s own buffer or, after a snapshot, a fresh one
        (copy-on-write). Returns logits [S, V] or [V].
        """
        kv = state['kv']
        end_pos = step.start_pos + step.num_tokens
        kv[:, :, :, step.start_pos:end_pos] = step.tensors['presents'][:, 0]
        if 'new_conv' in step.tensors:
            out_state['conv'].copy_(step.tensors['new_conv'])
        logits = step.tensors[export.LOGITS][0]  # [R, V]
        return logits if step.all_logits else logits[0]

    def _run(self, step: StepBindings) -> None:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start_pos: int, state: dict[str, torch.Tensor],
                all_logits: bool = False, out_state: dict[str, torch.Tensor] | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Run tokens at ``[start_pos, start_pos + S)`` over the slot state (KV written)."""
        if return_hidden:
            raise InvalidArgumentError('the compiled graph returns no hidden states (MTP runs '
                                       'on backend.kind: torch)')
        step = self.bind(token_ids, start_pos, state, all_logits)
        self._run(step)
        return self.finish(step, state, state if out_state is None else out_state)
