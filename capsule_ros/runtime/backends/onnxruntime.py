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
The ``onnxruntime`` backend: the exported step graph, state bound by address through IOBinding.

Every step binds the slot's KV buffers (``past_key_values_{i}``, whole, fixed shape) by their
data pointers and lets the graph write its outputs into tensors allocated for them: ORT copies
no state in or out, and the only state write is the new positions (see ``compiled``). The CPU
execution provider runs here; the CUDA one where ``backend.device`` is ``cuda`` and ORT has it.
"""

from capsule_ros.runtime.backends.compiled import (CompiledStepModel, prepare_graph,
                                                   StepBindings)
from capsule_ros.runtime.errors import InvalidArgumentError
import torch

NUMPY_TYPES = {torch.float32: 'float32', torch.float16: 'float16', torch.int64: 'int64'}


class OnnxRuntimeModel(CompiledStepModel):
    """The exported graph in an ``onnxruntime.InferenceSession``."""

    def __init__(self, model, layout, path, device: torch.device, num_threads: int = 0):
        """Open an inference session on the graph at ``path``."""
        import onnxruntime
        if device.type == 'cuda':
            if 'CUDAExecutionProvider' not in onnxruntime.get_available_providers():
                raise InvalidArgumentError(
                    'parameter backend.device: cuda needs onnxruntime-gpu (the installed '
                    'onnxruntime has no CUDAExecutionProvider)')
            providers = [('CUDAExecutionProvider', {'device_id': device.index or 0})]
        else:
            providers = ['CPUExecutionProvider']
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.device = device
        super().__init__(model, layout, f'onnxruntime {onnxruntime.__version__} '
                                        f'{providers[0] if device.type == "cpu" else "cuda"} '
                                        f'{model.dtype}')
        self.path = path

    @classmethod
    def build(cls, model_config, weights, weights_sha256, dtype, device, max_seq_len,
              cache_dir, num_threads=0, progress=None) -> 'OnnxRuntimeModel':
        """Export (or find in the cache) the graph of these weights and open it."""
        model, layout, path = prepare_graph(model_config, weights, weights_sha256, dtype,
                                            max_seq_len, cache_dir, progress)
        return cls(model, layout, path, device, num_threads)

    def _run(self, step: StepBindings) -> None:
        import numpy
        binding = self.session.io_binding()
        for spec in self.bindings:
            tensor = step.tensors[spec.name]
            arguments = (spec.name, tensor.device.type, tensor.device.index or 0,
                         numpy.dtype(NUMPY_TYPES[tensor.dtype]), tuple(tensor.shape),
                         tensor.data_ptr())
            if spec.is_input:
                binding.bind_input(*arguments)
            else:
                binding.bind_output(*arguments)
        self.session.run_with_iobinding(binding)
