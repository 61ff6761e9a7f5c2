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
"""Parity of the Llama-family model file with transformers on small random-weight configs."""

from capsule_ros.runtime.loader import load_hf_directory
from capsule_ros.runtime.models.llama import LlamaConfig, LlamaModel
from capsule_ros.runtime.testing import write_tiny_model
import pytest
import torch


VARIANTS = {
    'llama3-rope-scaling': {'rope_scaling': {
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 128}},
    'linear-rope-scaling': {'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}},
    'qwen2-qkv-bias': {'model_type': 'qwen2', 'tie_word_embeddings': False},
    'qwen3-qk-norm': {'model_type': 'qwen3', 'head_dim': 32},
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_random_weight_variant_matches_transformers(variant, tmp_path):
    """Prefill + 16 decode steps: logits within 1e-4 of transformers, same greedy tokens."""
    from transformers import AutoModelForCausalLM

    directory = write_tiny_model(tmp_path / variant, VARIANTS[variant])
    hf_config, weights = load_hf_directory(directory)
    config = LlamaConfig.from_hf(hf_config)
    assert config.num_heads != config.num_kv_heads  # GQA is exercised
    if 'rope_scaling' in VARIANTS[variant]:  # the scaling reached the checkpoint
        assert hf_config['rope_parameters']['rope_type'] != 'default'
    model = LlamaModel(config, weights, torch.float32, torch.device('cpu'), 512)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    kv = torch.zeros(model.state_specs()[0].shape)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (200,), generator=generator)
    with torch.inference_mode():
        ours = model.forward(tokens, 0, {'kv': kv}, all_logits=True)
        theirs = reference(tokens[None]).logits[0]
        assert float((ours - theirs).abs().max()) <= 1e-4
        sequence = tokens.tolist()
        for _ in range(16):
            token = int(ours[-1].argmax()) if ours.dim() == 2 else int(ours.argmax())
            sequence.append(token)
            ours = model.forward(torch.tensor([token]), len(sequence) - 1, {'kv': kv})
            theirs = reference(torch.tensor([sequence])).logits[0, -1]
            assert int(theirs.argmax()) == int(ours.argmax())
            assert float((ours - theirs).abs().max()) <= 1e-4
