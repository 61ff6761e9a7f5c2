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
Write a transformers hybrid checkpoint (LFM2, Qwen3.5 text) as a GGUF that llama.cpp loads.

The hybrid benchmark runs llama.cpp (llama-cpp-python) on the same random weights as this
engine. Only the two families of ``bench/hybrids.py`` are handled, written with the ``gguf``
package as F32, F16 or BF16 (``Lfm2ForCausalLM`` -> arch ``lfm2``, ``Qwen3_5ForCausalLM`` ->
arch ``qwen35``). Tensor names go through ``gguf.get_tensor_name_map``; the values are changed
where llama.cpp's graph computes something other than transformers' module does:

- both: depthwise conv kernels ``[channels, 1, kernel]`` lose the middle axis (``ggml_ssm_conv``
  takes a 2-D kernel, and only in F32); 1-D tensors and norms stay F32 as well (as llama.cpp's
  own converter keeps them), only the matrices take the chosen type; tied embeddings write no
  ``output`` (llama.cpp reuses ``token_embd``).
- LFM2: the per-layer KV head count is 0 on conv layers (llama.cpp's marker of a recurrent
  layer); the MLP width is read off the tensors (transformers' ``block_auto_adjust_ff_dim``
  rule already shaped them); the final norm is ``token_embd_norm`` (llama.cpp's name for it).
- Qwen3.5: ``A_log`` is stored as ``-exp(A_log)`` (llama.cpp multiplies the softplus by
  ``ssm_a`` directly); ``dt_bias`` becomes ``ssm_dt.bias``; every Qwen3.5 RMSNorm but the gated
  one inside the DeltaNet computes ``x * (1 + weight)`` in transformers and ``x * weight`` in
  llama.cpp, so those weights get +1; with fewer key than value heads, the value heads are
  reordered from grouped (value heads of one key head adjacent, transformers'
  ``repeat_interleave``) to tiled (``ggml_repeat``'s broadcast) in every tensor that has a
  value-head axis (``in_proj_qkv``'s V rows, ``in_proj_z``, ``in_proj_a``/``b``, ``A_log``,
  ``dt_bias``, the conv kernel's V channels, ``out_proj``'s columns); the rotary sections are
  the default interleaved MRoPE ``[11, 11, 10, 0]`` (text positions: equal to plain partial
  RoPE), split anew for a rotary width other than 64.

The tokenizer is the bundled SmolLM2 GGUF's ``tokenizer.*`` metadata copied key by key (BPE
``gpt2``, pre-tokenizer ``smollm``) after checking it equals the checkpoint's
``tokenizer.json``; the token list is padded with unused ``[PAD<i>]`` tokens up to the model's
vocabulary size, as llama.cpp sizes the embedding by the token count.

Export one checkpoint, or check the export of both families against transformers (tiny random
models in fp32, logits at every prompt position)::

    PYTHONPATH=. python bench/gguf_export.py MODEL_DIR OUT.gguf [--dtype bf16]
    PYTHONPATH=. python bench/gguf_export.py --check
"""

import argparse
import json
from pathlib import Path
import sys
import tempfile

import gguf
import numpy as np
import torch

EXPORT_FORMAT = 1  # bump when the written GGUFs change (bench/hybrids.py caches them)
ARCHS = {'lfm2': gguf.MODEL_ARCH.LFM2, 'qwen3_5_text': gguf.MODEL_ARCH.QWEN35}
FILE_TYPES = {'f32': (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              'f16': (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              'bf16': (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
# llama.cpp's key (gguf-py 0.19 on PyPI has no constant for it yet)
RECURRENT_LAYERS_KEY = '{arch}.attention.recurrent_layers'
QWEN3_5_MROPE_SECTIONS = [11, 11, 10]  # transformers' default mrope_section (64 rotary dims)
CHECK_TOKENS = 48


def export_gguf(model_directory, target, tokenizer_gguf, dtype='bf16', progress=None):
    """Write the checkpoint in ``model_directory`` as the GGUF ``target``; return its path."""
    from safetensors import safe_open

    model_directory, target = Path(model_directory), Path(target)
    config = json.loads((model_directory / 'config.json').read_text())
    family = config['model_type']
    if family not in ARCHS:
        raise ValueError(f'{model_directory}: model_type {family!r} is not one of {list(ARCHS)}')
    arch = ARCHS[family]
    tensor_type, file_type = FILE_TYPES[dtype]
    writer = gguf.GGUFWriter(target, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_directory.name)
    writer.add_file_type(file_type)
    name_map = gguf.get_tensor_name_map(arch, config['num_hidden_layers'])
    paths = sorted(model_directory.glob('*.safetensors'))
    if not paths:
        raise FileNotFoundError(f'{model_directory}: no *.safetensors')
    mlp_width = None
    for path in paths:
        with safe_open(str(path), framework='pt') as weights:
            for name in weights.keys():
                tensor = weights.get_tensor(name)
                if name.endswith(('feed_forward.w1.weight', 'mlp.gate_proj.weight')):
                    mlp_width = tensor.shape[0]
                converted = (lfm2_tensors if family == 'lfm2' else qwen3_5_tensors)(
                    config, name, tensor)
                for hf_name, value in converted:
                    gguf_name = name_map.get_name(hf_name, try_suffixes=('.weight', '.bias'))
                    if gguf_name is None:
                        raise ValueError(f'{model_directory}: no GGUF name for {hf_name!r}')
                    stored = storage_type(gguf_name, value, tensor_type)
                    writer.add_tensor(gguf_name, as_numpy(value, stored), raw_dtype=stored)
    if family == 'lfm2':
        lfm2_parameters(writer, config, mlp_width)
    else:
        qwen3_5_parameters(writer, config)
    copy_tokenizer(writer, Path(tokenizer_gguf), model_directory, config['vocab_size'])
    if progress:
        progress(f'writing {target} ({dtype}) ...')
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


# -- tensors ----------------------------------------------------------------------------------


def lfm2_tensors(config, name, tensor):
    """Yield (transformers name, tensor) for llama.cpp's ``lfm2`` graph."""
    del config  # LFM2 needs no hyperparameter to convert a tensor
    if name.endswith('conv.conv.weight'):
        tensor = tensor.squeeze(1)  # [channels, 1, kernel] -> [channels, kernel]
    yield name, tensor


def qwen3_5_tensors(config, name, tensor):
    """Yield (transformers name, tensor) for llama.cpp's ``qwen35`` graph."""
    if name.startswith('mtp.') or name.startswith('model.mtp.'):
        return  # the multi-token-prediction head is not part of the decoder graph
    num_key_heads = config['linear_num_key_heads']
    num_value_heads = config['linear_num_value_heads']
    key_dim = config['linear_key_head_dim'] * num_key_heads
    value_head_dim = config['linear_value_head_dim']

    def tiled(value, dim, head_dim):
        return reorder_value_heads(value, dim, num_key_heads, num_value_heads // num_key_heads,
                                   head_dim)

    if name.endswith('.A_log'):
        tensor = tiled(-torch.exp(tensor.float()), 0, 1)
    elif name.endswith('.dt_bias'):
        name = name[:-len('.dt_bias')] + '.dt_proj.bias'
        tensor = tiled(tensor.float(), 0, 1)
    elif name.endswith('linear_attn.conv1d.weight'):
        tensor = tensor.squeeze(1)  # [q + k + v channels, 1, kernel] -> [channels, kernel]
        tensor = torch.cat([tensor[:2 * key_dim], tiled(tensor[2 * key_dim:], 0,
                                                        value_head_dim)])
    elif name.endswith('linear_attn.in_proj_qkv.weight'):
        tensor = torch.cat([tensor[:2 * key_dim], tiled(tensor[2 * key_dim:], 0,
                                                        value_head_dim)])
    elif name.endswith('linear_attn.in_proj_z.weight'):
        tensor = tiled(tensor, 0, value_head_dim)
    elif name.endswith(('linear_attn.in_proj_a.weight', 'linear_attn.in_proj_b.weight')):
        tensor = tiled(tensor, 0, 1)
    elif name.endswith('linear_attn.out_proj.weight'):
        tensor = tiled(tensor, 1, value_head_dim)
    elif name.endswith('norm.weight') and not name.endswith('linear_attn.norm.weight'):
        tensor = tensor.float() + 1  # x * (1 + w) in transformers, x * w in llama.cpp
    yield name, tensor


def reorder_value_heads(tensor, dim, num_key_heads, heads_per_key, head_dim):
    """
    Reorder the value-head axis ``dim`` from grouped to tiled order.

    ``dim`` has ``num_key_heads * heads_per_key * head_dim`` entries; grouped order is
    [key head, value head of it, head_dim], tiled order [value head of it, key head, head_dim].
    """
    if heads_per_key == 1:
        return tensor
    shape = list(tensor.shape)
    grouped = tensor.reshape(shape[:dim] + [num_key_heads, heads_per_key, head_dim]
                             + shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).contiguous().reshape(shape)


def storage_type(gguf_name, tensor, tensor_type):
    """F32 where llama.cpp's kernels read only F32; ``tensor_type`` for the matrices."""
    if (tensor.dim() < 2 or gguf_name.endswith('_norm.weight')
            or not gguf_name.endswith('.weight')
            or '.shortconv.conv.' in gguf_name or '.ssm_conv1d.' in gguf_name):
        return gguf.GGMLQuantizationType.F32
    return tensor_type


def as_numpy(tensor, tensor_type):
    """Return the tensor's values as a numpy array of ``tensor_type`` (BF16: uint16 bits)."""
    if tensor_type == gguf.GGMLQuantizationType.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.float32).contiguous().numpy()


# -- metadata ---------------------------------------------------------------------------------


def rope_theta(config):
    """Return the RoPE base of a transformers 5 (``rope_parameters``) or 4 config."""
    return float((config.get('rope_parameters') or {}).get('rope_theta',
                                                           config.get('rope_theta', 10000.0)))


def lfm2_parameters(writer, config, mlp_width):
    """Hyperparameters llama.cpp's ``lfm2`` loader reads."""
    writer.add_context_length(config['max_position_embeddings'])
    writer.add_embedding_length(config['hidden_size'])
    writer.add_block_count(config['num_hidden_layers'])
    writer.add_feed_forward_length(mlp_width)
    writer.add_head_count(config['num_attention_heads'])
    writer.add_head_count_kv([0 if layer == 'conv' else config['num_key_value_heads']
                              for layer in config['layer_types']])
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config['norm_eps'])
    writer.add_shortconv_l_cache(config['conv_L_cache'])
    writer.add_vocab_size(config['vocab_size'])


def qwen3_5_parameters(writer, config):
    """Hyperparameters llama.cpp's ``qwen35`` loader reads."""
    if config['linear_key_head_dim'] != config['linear_value_head_dim']:
        raise ValueError('llama.cpp qwen35 needs linear_key_head_dim == linear_value_head_dim')
    rope = config.get('rope_parameters') or {}
    head_dim = config['head_dim']
    rotary_dims = int(head_dim * rope.get('partial_rotary_factor', 0.25))
    sections = list(rope.get('mrope_section', QWEN3_5_MROPE_SECTIONS))[:3]
    if sum(sections) != rotary_dims // 2:
        # a smaller head than the real models' (ggml asserts the sections fit the head): text
        # positions are equal in every section, so any split of the rotary pairs is exact
        pairs = rotary_dims // 2
        sections = [pairs // 3 + (index < pairs % 3) for index in range(3)]
    recurrent = [layer == 'linear_attention' for layer in config['layer_types']]
    writer.add_context_length(config['max_position_embeddings'])
    writer.add_embedding_length(config['hidden_size'])
    writer.add_block_count(config['num_hidden_layers'])
    writer.add_feed_forward_length(config['intermediate_size'])
    writer.add_head_count(config['num_attention_heads'])
    writer.add_head_count_kv(config['num_key_value_heads'])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(rotary_dims)
    writer.add_rope_dimension_sections(sections + [0])
    writer.add_layer_norm_rms_eps(config['rms_norm_eps'])
    writer.add_ssm_conv_kernel(config['linear_conv_kernel_dim'])
    writer.add_ssm_state_size(config['linear_key_head_dim'])
    writer.add_ssm_group_count(config['linear_num_key_heads'])
    writer.add_ssm_time_step_rank(config['linear_num_value_heads'])
    writer.add_ssm_inner_size(config['linear_value_head_dim'] * config['linear_num_value_heads'])
    writer.add_array(RECURRENT_LAYERS_KEY.format(arch=writer.arch), recurrent)
    # older loaders derive the layer types from the interval instead
    writer.add_full_attention_interval(recurrent.index(False) + 1)
    writer.add_vocab_size(config['vocab_size'])


def copy_tokenizer(writer, tokenizer_gguf, model_directory, vocab_size):
    """Copy the ``tokenizer.*`` keys of ``tokenizer_gguf``, padding the tokens to vocab_size."""
    reader = gguf.GGUFReader(tokenizer_gguf)
    tokens = reader.fields['tokenizer.ggml.tokens'].contents()
    vocab = json.loads((model_directory / 'tokenizer.json').read_text())['model']['vocab']
    if len(vocab) != len(tokens) or any(vocab.get(token) != index
                                        for index, token in enumerate(tokens)):
        raise ValueError(f'{model_directory}/tokenizer.json is not the tokenizer of '
                         f'{tokenizer_gguf}')
    if vocab_size < len(tokens):
        raise ValueError(f'vocab_size {vocab_size} < {len(tokens)} tokens')
    padding = vocab_size - len(tokens)
    for key, field in reader.fields.items():
        if not key.startswith('tokenizer.'):
            continue
        value = field.contents()
        if key == 'tokenizer.ggml.tokens':
            value = value + [f'[PAD{index}]' for index in range(len(tokens), vocab_size)]
        elif key == 'tokenizer.ggml.token_type':
            value = value + [int(gguf.TokenType.UNUSED)] * padding
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


# -- check against transformers ---------------------------------------------------------------


def llama_logits(gguf_path, tokens):
    """Return llama.cpp's fp32 logits at every position of ``tokens`` ([tokens, vocab])."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llama = Llama(model_path=str(gguf_path), n_ctx=max(256, len(tokens) + 16), n_threads=2,
                  n_threads_batch=2, logits_all=True, type_k=GGML_TYPE_F32,
                  type_v=GGML_TYPE_F32, verbose=False)
    llama.eval(tokens)
    logits = np.array(llama.scores[:len(tokens)], dtype=np.float32)
    llama.close()
    return logits


def transformers_logits(model_directory, tokens):
    """Return transformers' fp32 logits at every position of ``tokens``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].numpy()


def check(workdir):
    """Tiny random LFM2 and Qwen3.5 in fp32: llama.cpp's logits vs transformers'; a dict."""
    from capsule_ros.runtime import loader
    from capsule_ros.runtime.testing import write_tiny_model

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, 20000, (CHECK_TOKENS,), generator=generator).tolist()
    results = {}
    for family in ARCHS:
        directory = write_tiny_model(Path(workdir) / family, family=family)
        path = export_gguf(directory, Path(workdir) / f'{family}.gguf',
                           loader.bundled_model_path(), dtype='f32')
        ours = llama_logits(path, tokens)
        reference = transformers_logits(directory, tokens)
        difference = np.abs(ours - reference)
        results[family] = {
            'tokens': len(tokens), 'max_abs_diff': float(difference.max()),
            'logit_scale': float(np.abs(reference).max()),
            'argmax_agree': int((ours.argmax(-1) == reference.argmax(-1)).sum())}
    return results


def main():
    """Export one checkpoint, or check both families on tiny models."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model_dir', nargs='?')
    parser.add_argument('out', nargs='?')
    parser.add_argument('--dtype', choices=list(FILE_TYPES), default='bf16')
    parser.add_argument('--check', action='store_true',
                        help='tiny fp32 models of both families: llama.cpp vs transformers')
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    if arguments.check:
        with tempfile.TemporaryDirectory(prefix='gguf-check-') as workdir:
            for family, row in check(workdir).items():
                print(f'{family}: max |logit diff| {row["max_abs_diff"]:.3g} over '
                      f'{row["tokens"]} positions (max |logit| {row["logit_scale"]:.3g}), '
                      f'argmax equal at {row["argmax_agree"]}/{row["tokens"]}')
        return
    if not (arguments.model_dir and arguments.out):
        parser.error('give MODEL_DIR and OUT, or --check')
    from capsule_ros.runtime import loader

    export_gguf(arguments.model_dir, arguments.out, loader.bundled_model_path(),
                arguments.dtype, progress=lambda line: print(line, file=sys.stderr))


if __name__ == '__main__':
    main()
