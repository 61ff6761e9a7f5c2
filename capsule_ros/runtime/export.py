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
ONNX export of one model step over the session's execution state, every buffer explicit.

The graph is the compiled path's contract: ONNX Runtime runs it here, TensorRT builds its
engine from the very same file on the Jetson. One graph serves prefill chunks and decode steps
(the token axis is dynamic; TensorRT gives it two optimization profiles). Binding names are
TensorRT Edge-LLM's, with a batch axis of 1:

    inputs   input_ids              [1, S]              int64   the tokens at positions
                                                                 [start, start + S)
             kvcache_start_index    [1]                 int64   start: the session's position
             last_token_ids         [1, R]              int64   the rows whose logits are wanted
                                                                 (the last one in prefill, all
                                                                 of them in a verify pass)
             past_key_values_{i}    [1, 2, Hkv, T, hd]  model   attention layer i's whole slot
                                                                 buffer (T = engine.max_seq_len);
                                                                 valid below start
             conv_state_{j}         [1, D, K]           model   conv layer j's last K inputs
                                                                 (LFM2; ignored at start 0)
    outputs  logits                 [1, R, V]           float32
             present_key_values_{i} [1, 2, Hkv, S, hd]  model   the keys and values of the S
                                                                 new positions only
             present_conv_state_{j} [1, D, K]           model   conv layer j's new state, whole

No output aliases an input: the backend writes ``present_key_values_{i}`` into the slot buffer
at ``[start, start + S)`` (S positions: a decode step copies 2 * Hkv * hd values per layer, not
the context) and ``present_conv_state_{j}`` into the conv state's copy-on-write target. Every
past position is read where it lies, bound by address. Attention is computed in two parts,
against the slot buffer (keys below ``start``) and against the new keys (causal), with one
softmax over both, so the graph never concatenates or rewrites the cache. Its cost is
the cost of reading the whole slot buffer: O(T) per step, which the backends' benchmark shows
next to the torch backend's O(position).

The export cache key covers the weights, the family and its config, the state layout, T, the
exporter version and torch's: a graph is re-exported only when one of them changes.
"""

from dataclasses import dataclass
import hashlib
import os
from pathlib import Path
import time

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.state import StateLayout
import torch
import torch.nn.functional as F  # noqa: N812

EXPORTER_VERSION = 1  # bump whenever the graph or the contract changes
OPSET = 18
INPUT_IDS, START_INDEX, LAST_TOKEN_IDS, LOGITS = (
    'input_ids', 'kvcache_start_index', 'last_token_ids', 'logits')


def past_name(layer: int) -> str:
    """Input binding of attention layer ``layer``'s KV slot buffer."""
    return f'past_key_values_{layer}'


def present_name(layer: int) -> str:
    """Output binding of attention layer ``layer``'s new keys and values."""
    return f'present_key_values_{layer}'


@dataclass(frozen=True)
class Binding:
    """
    One input or output of the graph: name, shape, dtype and the slot state it stands for.

    ``shape`` holds ints, or the names of the dynamic axes (``S``: tokens, ``R``: logits rows).
    ``state`` / ``layer``: the StateLayout buffer and its index along the first axis that the
    binding reads (``past_*``) or whose new positions it carries (``present_*``).
    """

    name: str
    shape: tuple
    dtype: torch.dtype
    is_input: bool
    state: str | None = None
    layer: int | None = None


def conv_name(layer: int) -> str:
    """Input binding of conv layer ``layer``'s state (its last K inputs)."""
    return f'conv_state_{layer}'


def present_conv_name(layer: int) -> str:
    """Output binding of conv layer ``layer``'s new state."""
    return f'present_conv_state_{layer}'


def contract(layout: StateLayout, vocab_size: int) -> list[Binding]:
    """Derive the graph's bindings from the StateLayout (what every compiled backend binds)."""
    if 'recurrent' in layout.by_name:
        raise InvalidArgumentError(
            'ONNX export covers the llama and lfm2 families; recurrent state (qwen3_5) runs on '
            'backend.kind: torch')
    kv = layout.by_name['kv']
    num_layers, two, num_kv_heads, max_seq_len, head_dim = kv.shape
    bindings = [Binding(INPUT_IDS, (1, 'S'), torch.int64, True),
                Binding(START_INDEX, (1,), torch.int64, True),
                Binding(LAST_TOKEN_IDS, (1, 'R'), torch.int64, True)]
    bindings += [Binding(past_name(layer), (1, two, num_kv_heads, max_seq_len, head_dim),
                         kv.dtype, True, 'kv', layer) for layer in range(num_layers)]
    conv = layout.by_name.get('conv')
    conv_layers = conv.shape[0] if conv is not None else 0
    bindings += [Binding(conv_name(layer), (1, *conv.shape[1:]), conv.dtype, True, 'conv',
                         layer) for layer in range(conv_layers)]
    bindings.append(Binding(LOGITS, (1, 'R', vocab_size), torch.float32, False))
    bindings += [Binding(present_name(layer), (1, two, num_kv_heads, 'S', head_dim), kv.dtype,
                         False, 'kv', layer) for layer in range(num_layers)]
    bindings += [Binding(present_conv_name(layer), (1, *conv.shape[1:]), conv.dtype, False,
                         'conv', layer) for layer in range(conv_layers)]
    return bindings


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate q and k heads [H + Hkv, S, hd] by RoPE (``roll`` by hd / 2 as a concatenation)."""
    half = qk.shape[-1] // 2
    return qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin_signed


def two_part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: torch.Tensor,
                       past_valid: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """
    GQA of the new tokens against the slot buffer and against each other, one softmax.

    q [H, S, hd]; k, v [Hkv, S, hd]; past [1, 2, Hkv, T, hd] (the slot buffer, keys where
    ``past_valid`` [T]); causal [S, S]. The g query heads of a KV head run as g * S rows
    against it. Returns [S, H hd].
    """
    num_heads, num_tokens, head_dim = q.shape
    num_kv_heads = k.shape[0]
    group = num_heads // num_kv_heads
    max_seq_len = past.shape[3]
    scale = head_dim ** -0.5
    q = q.reshape(num_kv_heads, group * num_tokens, head_dim)  # [Hkv, g S, hd]
    scores_past = torch.matmul(q, past[0, 0].transpose(1, 2)) * scale  # [Hkv, g S, T]
    scores_new = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hkv, g S, S]
    scores_past = scores_past.masked_fill(~past_valid, float('-inf'))
    scores_new = scores_new.masked_fill(~causal.repeat(group, 1), float('-inf'))
    probabilities = torch.softmax(
        torch.cat((scores_past, scores_new), dim=-1).float(), dim=-1).to(q.dtype)
    attention = (torch.matmul(probabilities[..., :max_seq_len], past[0, 1])
                 + torch.matmul(probabilities[..., max_seq_len:], v))  # [Hkv, g S, hd]
    return attention.reshape(num_heads, num_tokens, head_dim).transpose(0, 1).reshape(
        num_tokens, num_heads * head_dim)


def split_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> tuple:
    """(weight[:rows], weight[rows:], bias halves): separate matmuls keep reshapes contiguous."""
    return (weight[:rows], weight[rows:], None if bias is None else bias[:rows],
            None if bias is None else bias[rows:])


class StepGraph(torch.nn.Module):
    """A family's step in export form: the state in, the new state out, nothing written."""

    def __init__(self, model):
        """Hold ``model``'s prepared weights (dense and unpacked)."""
        super().__init__()
        if model.linears.packed or model.linears.num_int4:
            raise InvalidArgumentError('ONNX export needs dense weights (model.dtype float32, '
                                       'model.quantization none)')
        self.model = model
        self.splits = []
        for layer in model.layers:
            split = {}
            if 'qkv' in layer:
                split['qk'], split['v'], split['qk_bias'], split['v_bias'] = split_rows(
                    layer['qkv'].dense, layer['qkv'].bias, model.q_size + model.kv_size)
            gate_up = layer['gate_up' if 'gate_up' in layer else 'w13'].dense  # [2 I, D]
            split['gate'], split['up'], _, _ = split_rows(gate_up, None, gate_up.shape[0] // 2)
            self.splits.append(split)

    def attention(self, layer: dict, split: dict, h: torch.Tensor, past: torch.Tensor,
                  rope: tuple, masks: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend h [S, D]; return the output [S, H hd] and the new KV [1, 2, Hkv, S, hd]."""
        model = self.model
        config = model.config
        num_tokens = h.shape[0]
        qk = F.linear(h, split['qk'], split['qk_bias']).reshape(
            num_tokens, model.qk_heads, config.head_dim).transpose(0, 1)  # [H + Hkv, S, hd]
        v = F.linear(h, split['v'], split['v_bias']).reshape(
            num_tokens, config.num_kv_heads, config.head_dim).transpose(0, 1)  # [Hkv, S, hd]
        if layer['qk_norm'] is not None:
            qk = model._rms_norm(qk, layer['qk_norm'])
        q, k = rotate(qk, *rope).split((config.num_heads, config.num_kv_heads))
        return two_part_attention(q, k, v, past, *masks), torch.stack((k, v))[None]

    def mlp(self, down, split: dict, h: torch.Tensor) -> torch.Tensor:
        """Apply the SwiGLU MLP to h [S, D], gate and up as separate matmuls."""
        gate = F.linear(h, split['gate'])  # [S, I]
        up = F.linear(h, split['up'])  # [S, I]
        return self.model.linears.apply(F.silu(gate) * up, down)

    def forward(self, input_ids: torch.Tensor, kvcache_start_index: torch.Tensor,
                last_token_ids: torch.Tensor, *state: torch.Tensor):
        """Return logits [1, R, V], each attention layer's new KV, then the new conv states."""
        model = self.model
        ids = input_ids[0]  # [S]
        num_tokens = ids.shape[0]
        positions = kvcache_start_index + torch.arange(num_tokens)  # [S]
        rope = (model.rope_cos.index_select(0, positions)[None],  # [1, S, hd]
                model.rope_sin_signed.index_select(0, positions)[None])  # [1, S, hd]
        num_kv = self.num_kv_layers()
        pasts, convs = state[:num_kv], state[num_kv:]
        max_seq_len = pasts[0].shape[3]
        # [T]: the slot positions below start are the past; the rest is stale. [S, S]: new
        # token i sees new tokens j <= i
        masks = (torch.arange(max_seq_len) < kvcache_start_index,
                 torch.arange(num_tokens)[None, :] <= torch.arange(num_tokens)[:, None])
        x = model.embed_tokens.index_select(0, ids)  # [S, D]
        x, presents, conv_states = self.layers(x, kvcache_start_index, pasts, convs, rope, masks)
        x = model._rms_norm(x.index_select(0, last_token_ids[0]), model.final_norm)  # [R, D]
        return (model.logits(x)[None], *presents, *conv_states)

    def num_kv_layers(self) -> int:
        """How many attention layers (KV bindings) the model has."""
        return len(self.model.layers)


class LlamaStepGraph(StepGraph):
    """The Llama family: attention in every layer."""

    def layers(self, x, start, pasts, convs, rope, masks):
        """Run every layer; return x, the new KV per layer, no conv state."""
        presents = []
        for layer, split, past in zip(self.model.layers, self.splits, pasts):
            h = self.model._rms_norm(x, layer['input_norm'])
            attention, present = self.attention(layer, split, h, past, rope, masks)
            presents.append(present)
            x = x + self.model.linears.apply(attention, layer['o'])
            h = self.model._rms_norm(x, layer['post_attention_norm'])
            x = x + self.mlp(layer['down'], split, h)
        return x, presents, []


class Lfm2StepGraph(StepGraph):
    """LFM2: gated short convolutions (conv state in, new conv state out) and attention."""

    def num_kv_layers(self) -> int:
        """How many attention layers (KV bindings) the model has."""
        return len(self.model.config.attention_layers)

    def layers(self, x, start, pasts, convs, rope, masks):
        """Run every layer; return x, the new KV per attention layer, the new conv states."""
        model = self.model
        kernel_size = model.config.conv_kernel_size
        presents, conv_states = [], []
        for index, (layer, split) in enumerate(zip(model.layers, self.splits)):
            ordinal = model.state_index[index]
            h = model._rms_norm(x, layer['operator_norm'])
            if 'qkv' in layer:
                attention, present = self.attention(layer, split, h, pasts[ordinal], rope,
                                                    masks)
                presents.append(present)
                x = x + model.linears.apply(attention, layer['out_proj'])
            else:
                # the last K inputs before the chunk (none at position 0), then B * x
                previous = torch.where(start == 0, torch.zeros_like(convs[ordinal][0]),
                                       convs[ordinal][0])  # [D, K]
                b, c, xs = model.linears.apply(h, layer['in_proj']).chunk(3, dim=-1)  # [S, D]
                window = torch.cat((previous.transpose(0, 1), b * xs))  # [K + S, D]
                conv_states.append(window[-kernel_size:].transpose(0, 1)[None])  # [1, D, K]
                num_tokens = h.shape[0]
                taps = layer['conv_taps']  # [K, D] fp32
                conv = window[1:1 + num_tokens] * taps[0]
                for tap in range(1, kernel_size):
                    conv = conv + window[tap + 1:tap + 1 + num_tokens] * taps[tap]
                if layer['conv_bias'] is not None:
                    conv = conv + layer['conv_bias']
                x = x + model.linears.apply(c * conv.to(x.dtype), layer['out_proj'])
            h = model._rms_norm(x, layer['ffn_norm'])
            x = x + self.mlp(layer['w2'], split, h)
        return x, presents, conv_states


STEP_GRAPHS = {'llama': LlamaStepGraph, 'lfm2': Lfm2StepGraph}
EXPORTABLE_FAMILIES = tuple(STEP_GRAPHS)


def export_key(model, weights_sha256: str, layout: StateLayout) -> str:
    """Cache key of a graph: weights, family and config, layout, T, exporter and torch."""
    parts = [weights_sha256, model.family, model.config.hf_config_json, layout.layout_hash(),
             str(model.max_seq_len), str(model.dtype), f'exporter {EXPORTER_VERSION}',
             f'opset {OPSET}', f'torch {torch.__version__}']
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:24]


def export_onnx(model, layout: StateLayout, path: Path, progress=None) -> Path:
    """Export ``model``'s step graph to ``path`` (weights as external data next to it)."""
    report = progress or (lambda line: None)
    bindings = contract(layout, model.config.vocab_size)
    inputs = [binding for binding in bindings if binding.is_input]
    outputs = [binding for binding in bindings if not binding.is_input]
    num_tokens = 3  # example sizes (not 0 or 1, which export would specialize on)
    example = (torch.zeros(1, num_tokens, dtype=torch.int64),
               torch.tensor([2], dtype=torch.int64),
               torch.tensor([[num_tokens - 2, num_tokens - 1]], dtype=torch.int64),
               *(torch.zeros(binding.shape, dtype=binding.dtype) for binding in inputs[3:]))
    tokens = torch.export.Dim.AUTO
    rows = torch.export.Dim.AUTO
    dynamic_shapes = ({1: tokens}, None, {1: rows}, tuple([None] * (len(inputs) - 3)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report(f'exporting the {model.family} step graph to ONNX (opset {OPSET}, '
           f'{len(inputs) - 3} KV bindings) ...')
    with torch.inference_mode(False), torch.no_grad():
        exported = torch.export.export(STEP_GRAPHS[model.family](model), example,
                                       dynamic_shapes=dynamic_shapes)
        report(f'  traced ({time.monotonic() - started:.1f} s); converting to ONNX ...')
        program = torch.onnx.export(
            exported, dynamo=True, opset_version=OPSET,
            input_names=[binding.name for binding in inputs],
            output_names=[binding.name for binding in outputs], optimize=True, verbose=False)
    report(f'  converted and optimized ({time.monotonic() - started:.1f} s); writing ...')
    program.save(str(path), external_data=True)
    name_dynamic_axes(path)
    report(f'  wrote {path} ({time.monotonic() - started:.1f} s)')
    return path


def name_dynamic_axes(path: Path) -> None:
    """Rename the exporter's dynamic axes (``s70``...) to the contract's ``S`` and ``R``."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    graph = proto.graph
    by_name = {value.name: value for value in list(graph.input) + list(graph.output)}
    names = {by_name[INPUT_IDS].type.tensor_type.shape.dim[1].dim_param: 'S',
             by_name[LAST_TOKEN_IDS].type.tensor_type.shape.dim[1].dim_param: 'R'}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(proto, str(path))


def cached_export(model, weights_sha256: str, layout: StateLayout, cache_dir: Path,
                  progress=None) -> Path:
    """Return the cached graph for this model and layout, exporting it once if missing."""
    key = export_key(model, weights_sha256, layout)
    directory = Path(cache_dir) / f'onnx-{model.family}-{key}'
    path = directory / 'step.onnx'
    if path.is_file():
        return path
    staging = directory.with_name(directory.name + f'.partial-{os.getpid()}')
    export_onnx(model, layout, staging / 'step.onnx', progress)
    try:
        staging.rename(directory)  # atomic: a graph is complete or absent
    except OSError:
        if not path.is_file():  # another process won the race with a complete graph: fine
            raise
    if progress:
        progress(f'  cached as {path}')
    return path


def main(argv=None) -> int:
    """``python -m capsule_ros.runtime.export``: export (or find cached) a model's step graph."""
    import argparse

    from capsule_ros.runtime import loader
    from capsule_ros.runtime.models import registry
    parser = argparse.ArgumentParser(
        prog='python -m capsule_ros.runtime.export',
        description="Export the step graph of a checkpoint to ONNX (the compiled backends' "
                    'contract; cached) and print its path.')
    parser.add_argument('--model', default='', help="checkpoint; '' = the bundled SmolLM2")
    parser.add_argument('--max-seq-len', type=int, default=8192,
                        help='T, the slot length the graph binds (engine.max_seq_len)')
    parser.add_argument('--cache-dir', default='', help='default: the model cache')
    arguments = parser.parse_args(argv)
    cache_dir = Path(arguments.cache_dir) if arguments.cache_dir else loader.default_cache_dir()
    files = loader.resolve_model(arguments.model, cache_dir)
    hf_config, weights = loader.load_hf_directory(files.directory)
    model = registry.build_model(registry.config_from_hf(hf_config), weights, torch.float32,
                                 torch.device('cpu'), arguments.max_seq_len, 'none')
    path = cached_export(model, files.weights_sha256, StateLayout(model.state_specs()),
                         cache_dir / 'onnx', loader.print_progress)
    print(path)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
