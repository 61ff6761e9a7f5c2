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
RoPE tables for the families whose rotary embedding covers the whole head (Llama, LFM2).

``config`` is any family config with ``model_type``, ``head_dim`` and ``hf_config_json``.
"""

import json

from capsule_ros.runtime.errors import InvalidArgumentError
import torch


def rope_tables(config, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Return fp32 ``cos, sin`` tables of shape ``[max_seq_len, head_dim]``.

    The inverse frequencies and the attention scaling come from transformers' own RoPE
    initializers (default, linear, llama3, yarn, longrope), so every scaling variant matches the
    reference bit for bit. Dynamic NTK changes the frequencies with the sequence length and is
    refused: a static buffer cannot follow it.
    """
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = json.loads(config.hf_config_json)
    reference = AutoConfig.for_model(config.model_type, **{
        key: value for key, value in hf_config.items() if key != 'model_type'})
    rope_parameters = getattr(reference, 'rope_parameters', None) or {}
    rope_type = rope_parameters.get('rope_type', 'default')
    if rope_type == 'dynamic':
        raise InvalidArgumentError('dynamic NTK RoPE scaling is not supported (static buffers)')
    if rope_type == 'default':
        base = rope_parameters.get('rope_theta', getattr(reference, 'rope_theta', 10000.0))
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        attention_scaling = 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](reference, 'cpu')
    positions = torch.arange(max_seq_len, dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [T, head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling
