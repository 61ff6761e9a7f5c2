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
Model families keyed by the checkpoint's Hugging Face ``model_type``.

Every family module exports ``SUPPORTED_MODEL_TYPES``, a frozen config with ``from_hf`` and a
model with ``family``, ``weights_format``, ``state_specs()`` and
``forward(token_ids, start_pos, state, all_logits=False, out_state=None)``. The forward pass
writes KV in place at its positions and every other buffer (conv, recurrent) into
``out_state``, which lets a slot hand its current state to a capsule without copying it (see
capsule_ros.runtime.slots).
"""

import importlib
import json
from types import ModuleType

from capsule_ros.runtime.errors import InvalidArgumentError
import torch

# family module -> (config class, model class)
FAMILIES = {
    'llama': ('LlamaConfig', 'LlamaModel'),
    'lfm2': ('Lfm2Config', 'Lfm2Model'),
    'qwen3_5': ('Qwen35Config', 'Qwen35Model'),
}


def _module(family: str) -> ModuleType:
    return importlib.import_module(f'capsule_ros.runtime.models.{family}')


def supported_model_types() -> dict[str, str]:
    """Every supported ``model_type`` and the family that runs it."""
    return {model_type: family for family in FAMILIES
            for model_type in _module(family).SUPPORTED_MODEL_TYPES}


def family_of(hf_config: dict) -> str:
    """Return the family that runs this checkpoint, or refuse it naming the supported types."""
    model_type = hf_config.get('model_type', 'llama')
    for family in FAMILIES:  # imports only the families up to the one that matches
        if model_type in _module(family).SUPPORTED_MODEL_TYPES:
            return family
    raise InvalidArgumentError(
        f'model.path: model_type {model_type!r} is not supported; supported model types: '
        f'{", ".join(sorted(supported_model_types()))}')


def config_from_hf(hf_config: dict):
    """Build the family's frozen config from a Hugging Face config dict."""
    family = family_of(hf_config)
    return getattr(_module(family), FAMILIES[family][0]).from_hf(hf_config)


def build_model(config, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, max_seq_len: int, quantization: str):
    """Instantiate the model of ``config``'s family on ``weights`` (Hugging Face names)."""
    family = family_of(json.loads(config.hf_config_json))
    model_class = getattr(_module(family), FAMILIES[family][1])
    return model_class(config, weights, dtype, device, max_seq_len, quantization)
