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
Small random-weight models for fast exact tests of the runtime.

They are real Hugging Face checkpoints (``config.json`` + safetensors) written by transformers
from a config, with the default model's tokenizer, so every code path of the loader and the
engine runs on them; only the sizes are small.
"""

import json
from pathlib import Path
import shutil

from capsule_ros.runtime import loader
import torch


TINY_LLAMA = {
    'model_type': 'llama', 'hidden_size': 64, 'intermediate_size': 128,
    'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
    'max_position_embeddings': 1024, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': True,
    'rope_theta': 10000.0,
}


def write_tiny_model(directory: Path, overrides: dict | None = None, seed: int = 0) -> Path:
    """
    Write a random-weight Llama-family checkpoint with the bundled tokenizer to ``directory``.

    ``overrides`` change the config (e.g. RoPE scaling, q/k norm via ``model_type='qwen3'``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer_source = loader.resolve_model('').directory
    values = dict(TINY_LLAMA, **(overrides or {}))
    model_type = values.pop('model_type')
    vocab_size = json.loads((tokenizer_source / 'config.json').read_text())['vocab_size']
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():  # larger weights: logits far from ties
            parameter.normal_(0.0, 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja',
                 'special_tokens_map.json'):
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, directory / name)
    return directory
