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
Backends: where a model step runs. The engine, the capsule store and the node never touch one.

A backend provides what the engine calls ``self.model``:

- ``state_specs()``, ``family``, ``config``, ``dtype``, ``device``, ``max_seq_len`` and
  ``weights_format`` (part of the fingerprint, with ``backend.kind``: a capsule made on one
  backend is refused by another, whose numerics differ in the last bits);
- ``forward(token_ids, start_pos, state, all_logits=False, out_state=None)`` over the slot's
  StateLayout buffers: prefill chunks, decode steps and verify passes;

and its slot buffers are tensors the capsule code copies by range (``narrow`` / ``copy_``):
torch tensors in host memory (CPU) or device memory (CUDA; on TensorRT, device buffers
allocated with pycuda and seen through ``__cuda_array_interface__``), so snapshot, restore and
branch are host or device-to-device copies on every backend. Heavy imports happen here, when a
backend is chosen: a CPU-only install imports the package cleanly, and choosing a backend that
is not installed fails configure naming the missing package.

- ``torch``: the families in ``capsule_ros.runtime.models`` (CPU, CUDA).
- ``onnxruntime``: the exported step graph (``capsule_ros.runtime.export``) with IOBinding.
- ``tensorrt``: an engine built from the same graph, for the Jetson.
"""

import importlib.util

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.models import registry


def require_packages(kind: str, *modules: str) -> None:
    """Refuse ``backend.kind: kind`` naming the packages that are not installed."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise InvalidArgumentError(
            f'parameter backend.kind: {kind} needs the Python package(s) '
            f'{", ".join(missing)}, which are not installed here; install them or use '
            f'backend.kind: torch')


def build_model(config, model_config, weights: dict, weights_sha256: str, dtype, device,
                max_seq_len: int, cache_dir, progress=None):
    """Build the model of ``config.backend.kind`` on ``weights`` (Hugging Face names)."""
    kind = config.backend.kind
    if kind == 'torch':
        return registry.build_model(model_config, weights, dtype, device, max_seq_len,
                                    config.model.quantization)
    if config.model.quantization == 'int4':
        raise InvalidArgumentError(
            f'parameter model.quantization: int4 runs on backend.kind torch; use auto or none '
            f'with {kind}')
    if kind == 'onnxruntime':
        require_packages(kind, 'onnxruntime', 'onnx', 'onnxscript')
        from capsule_ros.runtime.backends.onnxruntime import OnnxRuntimeModel
        return OnnxRuntimeModel.build(model_config, weights, weights_sha256, dtype, device,
                                      max_seq_len, cache_dir, config.backend.num_threads,
                                      progress)
    if kind == 'tensorrt':
        require_packages(kind, 'tensorrt', 'pycuda', 'onnx', 'onnxscript')
        from capsule_ros.runtime.backends.tensorrt import TensorRTModel
        return TensorRTModel.build(model_config, weights, weights_sha256, dtype, device,
                                   max_seq_len, cache_dir, config.engine.prefill_chunk,
                                   progress)
    raise InvalidArgumentError(f'parameter backend.kind: unknown backend {kind!r}')
