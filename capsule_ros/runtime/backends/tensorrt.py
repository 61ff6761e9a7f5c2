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
The ``tensorrt`` backend (Jetson AGX Thor: JetPack 7.1, CUDA 13.0, TensorRT 10.13).

The engine is built from the very graph the ``onnxruntime`` backend runs (strongly typed, two
optimization profiles: decode / verify passes of up to ``MAX_DRAFT_TOKENS + 1`` tokens, and
prefill chunks up to ``engine.prefill_chunk``), cached under a key of the graph, TensorRT's
version, the GPU and the profiles. Slot buffers are device memory allocated with pycuda and
seen by torch through ``__cuda_array_interface__``; the graph's bindings get their addresses
with ``set_tensor_address`` (the slot's KV buffers themselves: nothing is copied in or out),
and the step runs with ``execute_async_v3`` on one stream. Snapshot, restore and branch are then
device-to-device copies of the ranges they need (the capsule code's ``copy_`` on those
tensors), and the copy-on-write of overwritten state re-points addresses instead of copying.

Everything here that is not a TensorRT or pycuda call (the bindings of a step, the profile
shapes, the cache key, the state writes) is shared with ``onnxruntime`` or is a pure function,
and is tested on the CPU; this module imports without TensorRT and pycuda. Not done yet: CUDA
graph capture of the decode step (it needs stable addresses per slot).
"""

import hashlib
from pathlib import Path
import time

from capsule_ros.runtime.backends.compiled import (CompiledStepModel, prepare_graph,
                                                   StepBindings)
from capsule_ros.runtime.config import MAX_DRAFT_TOKENS
from capsule_ros.runtime.export import INPUT_IDS, LAST_TOKEN_IDS
import torch

DECODE_PROFILE, PREFILL_PROFILE = 0, 1
MAX_VERIFY_TOKENS = MAX_DRAFT_TOKENS + 1


def profile_shapes(prefill_chunk: int) -> list[dict[str, tuple]]:
    """(min, opt, max) of the dynamic inputs per optimization profile (decode, then prefill)."""
    decode = {INPUT_IDS: ((1, 1), (1, 1), (1, MAX_VERIFY_TOKENS)),
              LAST_TOKEN_IDS: ((1, 1), (1, 1), (1, MAX_VERIFY_TOKENS))}
    prefill = {INPUT_IDS: ((1, 1), (1, prefill_chunk), (1, max(prefill_chunk, 2))),
               LAST_TOKEN_IDS: ((1, 1), (1, 1), (1, MAX_VERIFY_TOKENS))}
    return [decode, prefill]


def select_profile(num_tokens: int) -> int:
    """Return the profile a step of ``num_tokens`` tokens runs in."""
    return DECODE_PROFILE if num_tokens <= MAX_VERIFY_TOKENS else PREFILL_PROFILE


def engine_cache_key(onnx_path: Path, tensorrt_version: str, gpu_name: str,
                     profiles: list[dict[str, tuple]]) -> str:
    """Cache key of a built engine: the graph file, TensorRT's version, the GPU, the profiles."""
    digest = hashlib.sha256()
    for part in (Path(onnx_path).parent.name, tensorrt_version, gpu_name, repr(profiles)):
        digest.update(part.encode() + b'\n')
    return digest.hexdigest()[:24]


def build_engine(onnx_path: Path, profiles: list[dict[str, tuple]], progress=None) -> bytes:
    """Build a strongly typed serialized engine from the graph with ``profiles``."""
    import tensorrt as trt
    report = progress or (lambda line: None)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = '; '.join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f'TensorRT cannot parse {onnx_path}: {errors}')
    config = builder.create_builder_config()
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, optimum, high) in shapes.items():
            profile.set_shape(name, low, optimum, high)
        config.add_optimization_profile(profile)
    started = time.monotonic()
    report(f'building the TensorRT engine from {onnx_path} (minutes on a Jetson) ...')
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f'TensorRT could not build an engine from {onnx_path}')
    report(f'  built in {time.monotonic() - started:.0f} s')
    return bytes(serialized)


class TensorRTModel(CompiledStepModel):
    """The exported graph as a TensorRT engine over pycuda device buffers."""

    def __init__(self, model, layout, engine_bytes: bytes, device: torch.device):
        """Deserialize the engine, make one execution context and one stream."""
        import pycuda.autoprimaryctx  # noqa: F401  (the device's primary context)
        import pycuda.driver as cuda
        import tensorrt as trt
        self.cuda = cuda
        self.context_handle = cuda.Context.get_current()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            engine_bytes)
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.device = device
        super().__init__(model, layout, f'tensorrt {trt.__version__} {model.dtype}')

    @classmethod
    def build(cls, model_config, weights, weights_sha256, dtype, device, max_seq_len,
              cache_dir, prefill_chunk: int = 512, progress=None) -> 'TensorRTModel':
        """Export the graph, build its engine (or find it in the cache) and load it."""
        import pycuda.autoprimaryctx  # noqa: F401
        import pycuda.driver as cuda
        import tensorrt as trt
        model, layout, onnx_path = prepare_graph(model_config, weights, weights_sha256, dtype,
                                                 max_seq_len, cache_dir, progress)
        profiles = profile_shapes(prefill_chunk)
        key = engine_cache_key(onnx_path, trt.__version__, cuda.Device(0).name(), profiles)
        path = Path(cache_dir) / 'tensorrt' / f'{key}.engine'
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix('.partial')
            staging.write_bytes(build_engine(onnx_path, profiles, progress))
            staging.rename(path)
        return cls(model, layout, path.read_bytes(), device)

    def allocate(self, layout) -> dict[str, torch.Tensor]:
        """Allocate a slot's buffers in device memory with pycuda, zeroed, seen by torch."""
        import pycuda.gpuarray as gpuarray
        buffers = {}
        self.context_handle.push()  # executor threads have no current context
        try:
            for spec in layout.specs:
                array = gpuarray.zeros(spec.shape, dtype=torch.empty(
                    0, dtype=spec.dtype).numpy().dtype)
                tensor = torch.as_tensor(array, device=self.device)  # no copy
                tensor.pycuda_allocation = array  # keeps the memory alive with the tensor
                buffers[spec.name] = tensor
        finally:
            self.context_handle.pop()
        return buffers

    def _run(self, step: StepBindings) -> None:
        self.context_handle.push()
        try:
            self.context.set_optimization_profile_async(select_profile(step.num_tokens),
                                                        self.stream.handle)
            for spec in self.bindings:
                tensor = step.tensors[spec.name]
                if spec.is_input:
                    self.context.set_input_shape(spec.name, tuple(tensor.shape))
                self.context.set_tensor_address(spec.name, tensor.data_ptr())
            torch.cuda.current_stream().synchronize()  # inputs written by torch are ready
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError('TensorRT execute_async_v3 failed')
            self.stream.synchronize()
        finally:
            self.context_handle.pop()
