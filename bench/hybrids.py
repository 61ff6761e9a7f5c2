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
Capsule verbs on hybrid models at their real sizes: LFM2-350M and Qwen3.5-0.8B (text).

No hybrid weights can be had offline, so each family runs on a random-weight checkpoint written
once by transformers (``save_pretrained``) with the real architecture and vocabulary, cached
under ``~/.cache/capsule_ros/bench-models/<name>``. The engine runs it in bf16 with dense
weights. Per family and context (random token ids below 49000) it measures the capsule's bytes
per kind, prefill and decode speed, and the capsule verbs against the memory copies they must
beat, in interleaved rounds (the variants compared alternate inside each round; medians):

- snapshot (copy-on-write: conv/recurrent tensors by reference) vs cloning them at snapshot,
  and the decode step right after a snapshot (it allocates the fresh tensors) vs a plain one;
- rollback in place vs a raw copy of the conv + recurrent bytes;
- restore into another session vs a raw copy of the same bytes into that slot;
- time to first token: cold prefill vs restore + first token;
- the KV-only ablation: resetting position and last logits but not the conv/recurrent state.

A peer runs in the same rounds where llama-cpp-python is installed: llama.cpp on the same
random weights, written once as a bf16 GGUF by ``bench/gguf_export.py`` (cached next to the
checkpoint). Its cold prefill, ``save_state`` / ``load_state`` (the rollback: into the same
context after more tokens were evaluated) and the C calls under them, and whether a
``load_state`` continues the greedy tokens exactly as the uninterrupted run did.

Run from the repository root::

    PYTHONPATH=. python bench/hybrids.py [--contexts 512 2048 8000] [--families lfm2 qwen3_5]
                                         [--out bench/results] [--quick] [--no-llamacpp]

Writes ``hybrids.json``, ``hybrids.md`` and ``hybrids.png`` to ``--out``; progress on stderr.
"""

import argparse
import ctypes
import json
import math
import os
from pathlib import Path
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
VOCAB_LOW, VOCAB_HIGH = 1000, 49000  # inside the bundled tokenizer's 49152 ids
DECODE_STEPS = 16
ABLATION_STEPS = 16
ROUNDS = 9
QUICK_CONTEXTS = [64, 256]
QUICK_ROUNDS = 2
THREADS = 2
TARGET_RATIO = 1.3
SNAPSHOT_TARGET_MS = 1.0
FLAT_RATIO = 1.5  # snapshot at the slowest context / at the fastest: "flat in context"
# Pause before each timed sub-millisecond verb (and before its raw copy alike). After a
# parallel region torch's OpenMP worker spins for ~15 ms (GOMP_SPINCOUNT); on 2 cores shared
# with other work, a verb timed inside that window is often preempted for a whole scheduler
# slice (~12 ms instead of ~0.1 ms), which measures the machine, not the verb.
SETTLE_S = 0.02
# random weights: N(0, (GAIN / sqrt(fan_in))^2) for every matrix (and the depthwise convs), so
# each layer mixes as much as in a trained model (transformers' 0.02 init at width 1024 lets
# the embedding dominate the residual stream and the greedy output repeats the input)
WEIGHT_GAIN = 1.6
WEIGHT_SEED = 0
MODEL_FORMAT = 1  # bump when the written checkpoints change
# the llama.cpp peer: the checkpoints' own precision (exact; llama.cpp's CPU backend has bf16
# matmuls), llama-cpp-python's default batch, one decode token fed between timed verbs
LLAMA_DTYPE = 'bf16'
LLAMA_BATCH = 512
LLAMA_STEP_TOKEN = 4242
CONTINUE_STEPS = 16  # greedy tokens compared after a load_state

MODELS = {
    'lfm2': {
        'name': 'lfm2-350m-random',
        'title': 'LFM2-350M',
        'config': {
            # LFM2-350M's config.json (intermediate_size is its block_ff_dim; transformers'
            # block_auto_adjust_ff_dim rule makes the MLP int(2 * 6656 / 3) rounded up to a
            # multiple of 256 = 4608 wide)
            'model_type': 'lfm2', 'vocab_size': 65536, 'hidden_size': 1024,
            'intermediate_size': 6656, 'block_auto_adjust_ff_dim': True,
            'block_ffn_dim_multiplier': 1.0, 'block_multiple_of': 256,
            'num_hidden_layers': 16, 'num_attention_heads': 16, 'num_key_value_heads': 8,
            'full_attn_idxs': [2, 5, 8, 10, 12, 14], 'conv_L_cache': 3, 'conv_bias': False,
            'norm_eps': 1e-5, 'max_position_embeddings': 128000, 'tie_word_embeddings': True,
            'rope_theta': 1000000.0, 'bos_token_id': 1, 'eos_token_id': 7, 'pad_token_id': 0,
        },
    },
    'qwen3_5': {
        'name': 'qwen3.5-0.8b-text-random',
        'title': 'Qwen3.5-0.8B',
        'config': {
            # Qwen3.5-0.8B's text_config: 6 x (3 Gated DeltaNet + 1 gated attention)
            'model_type': 'qwen3_5_text', 'vocab_size': 248320, 'hidden_size': 1024,
            'intermediate_size': 3584, 'num_hidden_layers': 24,
            'layer_types': ['linear_attention'] * 3 + ['full_attention'],
            'num_attention_heads': 8, 'num_key_value_heads': 2, 'head_dim': 256,
            'linear_num_key_heads': 16, 'linear_num_value_heads': 16,
            'linear_key_head_dim': 128, 'linear_value_head_dim': 128,
            'linear_conv_kernel_dim': 4, 'rms_norm_eps': 1e-6, 'tie_word_embeddings': True,
            'max_position_embeddings': 262144,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000000.0,
                                'partial_rotary_factor': 0.25},
        },
    },
}
MODELS['qwen3_5']['config']['layer_types'] = MODELS['qwen3_5']['config']['layer_types'] * 6


def log(line):
    """Print progress on stderr (stdout stays clean)."""
    print(f'[hybrids] {line}', file=sys.stderr, flush=True)


def random_tokens(count, seed):
    """Return reproducible token ids below 49000."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB_LOW, VOCAB_HIGH, (count,), generator=generator).tolist()


def median(values):
    """Median of a non-empty list, else None."""
    return statistics.median(values) if values else None


def settle():
    """Let the OpenMP workers of the last forward pass go to sleep (see SETTLE_S)."""
    time.sleep(SETTLE_S)


def ms_since(started):
    """Milliseconds since ``started`` (a ``perf_counter`` value)."""
    return (time.perf_counter() - started) * 1000


# -- checkpoints --------------------------------------------------------------------------------


def model_dir(family):
    """Return the cached checkpoint of ``family``, writing it first if needed."""
    from capsule_ros.runtime.loader import default_cache_dir

    spec = MODELS[family]
    target = default_cache_dir() / 'bench-models' / spec['name']
    stamp = {'format': MODEL_FORMAT, 'config': spec['config'], 'gain': WEIGHT_GAIN,
             'seed': WEIGHT_SEED}
    marker = target / 'complete.json'
    if marker.is_file() and json.loads(marker.read_text()).get('stamp') == stamp:
        log(f'{family}: cached checkpoint {target}')
        return target
    write_model(family, target, stamp)
    return target


def write_model(family, target, stamp):
    """Write a random-weight bf16 checkpoint of ``family`` with the bundled tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from capsule_ros.runtime.testing import copy_bundled_tokenizer

    started = time.monotonic()
    values = dict(MODELS[family]['config'])
    model_type = values.pop('model_type')
    config = AutoConfig.for_model(model_type, **values)
    log(f'{family}: writing a random-weight checkpoint at real size to {target} (once) ...')
    log(f'{family}:   1/3 building {config.__class__.__name__} in fp32 ...')
    torch.manual_seed(WEIGHT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    log(f'{family}:   2/3 drawing {num_params / 1e6:.0f} M weights '
        f'({time.monotonic() - started:.0f} s) ...')
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() < 2:
                continue  # norms, decay parameters (A_log, dt_bias), biases keep their init
            fan_in = parameter[0].numel()
            parameter.normal_(0.0, WEIGHT_GAIN / math.sqrt(fan_in))
    model = model.to(torch.bfloat16)
    log(f'{family}:   3/3 saving bf16 safetensors ({time.monotonic() - started:.0f} s) ...')
    staging = target.with_name(f'{target.name}.tmp{os.getpid()}')
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        copy_bundled_tokenizer(staging)
        (staging / 'complete.json').write_text(json.dumps(
            {'stamp': stamp, 'parameters': num_params}, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    log(f'{family}: checkpoint written in {time.monotonic() - started:.0f} s')


def describe_model(directory):
    """Parameters and MLP width of a written checkpoint (as transformers laid it out)."""
    from safetensors import safe_open

    parameters = 0
    mlp_width = None
    for path in sorted(directory.glob('*.safetensors')):
        with safe_open(str(path), framework='pt') as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                parameters += math.prod(shape)
                if mlp_width is None and name.endswith(('feed_forward.w1.weight',
                                                        'mlp.gate_proj.weight')):
                    mlp_width = shape[0]
    return {'parameters': parameters, 'mlp_width': mlp_width}


def make_engine(family, directory, max_seq_len, capsule_dir):
    """Engine on the checkpoint: bf16, dense weights, 3 sessions, 2 threads."""
    from capsule_ros.runtime.config import PolicyConfig
    from capsule_ros.runtime.engine import PolicyEngine

    started = time.monotonic()
    engine = PolicyEngine(PolicyConfig.from_dict({
        'model': {'path': str(directory), 'dtype': 'bfloat16', 'quantization': 'none'},
        'backend': {'num_threads': THREADS},
        'engine': {'max_seq_len': max_seq_len, 'max_sessions': 3},
        'capsules': {'budget_bytes': 8 << 30, 'dir': str(capsule_dir)}}),
        progress=lambda line: log(f'{family}: {line}'))
    # first calls initialize kernels and fault the weights in: keep that out of the figures
    session = engine.create_session(system_prompt=False)
    engine.append(session, tokens=random_tokens(64, 0))
    engine.generate(session, 2, reply=False)
    engine.close_session(session)
    log(f'{family}: engine ready and warmed up in {time.monotonic() - started:.0f} s')
    return engine


# -- the llama.cpp peer ---------------------------------------------------------------------


def llamacpp_missing():
    """Why the llama.cpp peer cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f'llama-cpp-python is not installed ({error})'
    return None


def gguf_model(family, directory):
    """Return the GGUF of ``family``'s checkpoint (next to it), exporting it first if needed."""
    from gguf_export import export_gguf, EXPORT_FORMAT

    from capsule_ros.runtime import loader

    target = directory.with_name(f'{directory.name}.{LLAMA_DTYPE}.gguf')
    marker = target.with_name(f'{target.name}.json')
    stamp = {'checkpoint': json.loads((directory / 'complete.json').read_text())['stamp'],
             'export_format': EXPORT_FORMAT, 'dtype': LLAMA_DTYPE}
    if target.is_file() and marker.is_file() and json.loads(marker.read_text()) == stamp:
        log(f'{family}: cached GGUF {target}')
        return target
    started = time.monotonic()
    log(f'{family}: exporting the checkpoint as a {LLAMA_DTYPE} GGUF for llama.cpp (once) ...')
    staging = target.with_name(f'{target.name}.tmp{os.getpid()}')
    try:
        export_gguf(directory, staging, loader.bundled_model_path(), LLAMA_DTYPE,
                    progress=lambda line: log(f'{family}:   {line}'))
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)
    marker.write_text(json.dumps(stamp, indent=1))
    log(f'{family}: GGUF written in {time.monotonic() - started:.0f} s')
    return target


class LlamaPeer:
    """
    llama.cpp (llama-cpp-python) on a family's GGUF: one context, used like one session.

    Its state verbs copy the whole context: ``save_state`` serializes the KV cells and the
    conv/recurrent state (no logits: the caller keeps the token it sampled last),
    ``load_state`` replaces them.
    """

    def __init__(self, path, n_ctx):
        import llama_cpp

        self.api = llama_cpp
        self.n_ctx = n_ctx
        self.llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=LLAMA_BATCH, n_threads=THREADS,
            n_threads_batch=THREADS, logits_all=False, verbose=False)
        self.context = self.llama._ctx.ctx
        self.vocab_size = self.llama.n_vocab()
        self.llama.eval(random_tokens(64, 0))  # first calls build the graphs: keep them out
        self.step()
        self.llama.reset()

    def feed(self, tokens):
        """Evaluate ``tokens`` after the current position."""
        self.llama.eval(tokens)

    def step(self):
        """Decode a fixed token."""
        self.llama.eval([LLAMA_STEP_TOKEN])

    def last_logits(self):
        """Return a copy of the logits of the last evaluated token ([vocab])."""
        pointer = self.api.llama_get_logits_ith(self.context, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy()

    def continue_greedy(self, first_token, steps):
        """Feed ``first_token``, then ``steps - 1`` argmax tokens: (tokens after it, logits)."""
        tokens, logits = [], []
        token = first_token
        for _ in range(steps):
            self.feed([token])
            logits.append(self.last_logits())
            token = int(logits[-1].argmax())
            tokens.append(token)
        return tokens, np.stack(logits)

    def state_size(self):
        """Bytes ``llama_state_get_data`` writes now (a dry run of the serialization)."""
        return self.api.llama_state_get_size(self.context)

    def get_data(self, buffer):
        """Serialize the state into ``buffer`` (the C call under ``save_state``)."""
        return self.api.llama_state_get_data(self.context, buffer, len(buffer))

    def set_data(self, buffer, num_bytes, num_tokens):
        """Deserialize a state of ``num_tokens`` tokens (the C call under ``load_state``)."""
        if self.api.llama_state_set_data(self.context, buffer, num_bytes) != num_bytes:
            raise RuntimeError('llama_state_set_data failed')
        self.llama.n_tokens = num_tokens

    def seq_rm_rollback(self, position):
        """Try llama.cpp's in-place rollback (drop positions >= ``position``); True if done."""
        memory = self.api.llama_get_memory(self.context)
        accepted = bool(self.api.llama_memory_seq_rm(memory, 0, position, -1))
        if accepted:
            self.llama.n_tokens = position
        return accepted


class LlamaMeasurement:
    """
    The llama.cpp peer at one context: cold prefill, reference continuation, timed verbs.

    ``variants`` go into the engine's interleaved rounds; ``finish`` restores the state saved
    right after the prefill and compares the greedy continuation with the uninterrupted one.
    """

    def __init__(self, peer, family, context):
        self.peer = peer
        self.llama = peer.llama
        self.context = context
        self.samples = {key: [] for key in (
            'llama_step_ms', 'llama_save_state_ms', 'llama_state_get_ms',
            'llama_load_state_ms', 'llama_state_set_ms', 'llama_restore_step_ms')}
        log(f'{family} @ {context}: llama.cpp cold prefill ...')
        self.llama.reset()
        started = time.perf_counter()
        peer.feed(random_tokens(context, context))
        self.prefill_s = time.perf_counter() - started
        # the state holds no logits: the caller keeps the token sampled from them
        self.first_token = int(peer.last_logits().argmax())
        self.state = self.llama.save_state()
        self.state_bytes = self.state.llama_state_size
        self.buffer = (ctypes.c_uint8 * self.state_bytes)()
        if peer.get_data(self.buffer) != self.state_bytes:
            raise RuntimeError('llama_state_get_data wrote another size than save_state')
        self.scratch = (ctypes.c_uint8 * self.state_bytes)()
        self.reference_tokens, self.reference_logits = peer.continue_greedy(
            self.first_token, CONTINUE_STEPS)
        # llama.cpp's cheap rollback (drop the cells after the context) needs per-token
        # snapshots of the recurrent state (n_rs_seq, 0 by default): refused without them
        self.seq_rm_accepted = peer.seq_rm_rollback(context)
        self.llama.load_state(self.state)
        log(f'{family} @ {context}: llama.cpp prefill {self.prefill_s:.2f} s '
            f'({context / self.prefill_s:.0f} tok/s), state {self.state_bytes / 2 ** 20:.1f} '
            f'MiB, seq_rm rollback {"accepted" if self.seq_rm_accepted else "refused"}')

    def timed(self, key, function):
        """Decode a step, pause (SETTLE_S), time ``function()`` into ``samples[key]``."""
        self.peer.step()
        settle()
        started = time.perf_counter()
        function()
        self.samples[key].append(ms_since(started))

    def step(self):
        """Time a plain decode step."""
        settle()
        started = time.perf_counter()
        self.peer.step()
        self.samples['llama_step_ms'].append(ms_since(started))

    def save_state(self):
        """Time llama-cpp-python's whole state save (sizes, serializes, copies to bytes)."""
        self.timed('llama_save_state_ms', self.llama.save_state)

    def state_get(self):
        """Time llama_state_get_data alone, into a preallocated buffer."""
        self.peer.step()
        size = self.peer.state_size()
        if size > len(self.scratch):
            self.scratch = (ctypes.c_uint8 * size)()
        settle()
        started = time.perf_counter()
        self.peer.get_data(self.scratch)
        self.samples['llama_state_get_ms'].append(ms_since(started))

    def load_state(self):
        """Time load_state of the prefill's state: a rollback of the tokens since."""
        self.timed('llama_load_state_ms', lambda: self.llama.load_state(self.state))

    def state_set(self):
        """Time llama_state_set_data alone, from the buffer."""
        self.timed('llama_state_set_ms', lambda: self.peer.set_data(
            self.buffer, self.state_bytes, self.context))

    def restore_step(self):
        """Time load_state + the decode step of the kept token (its next logits)."""
        def restore_and_step():
            self.llama.load_state(self.state)
            self.peer.feed([self.first_token])
        self.timed('llama_restore_step_ms', restore_and_step)

    def variants(self):
        """Return groups of variants for the interleaved rounds (their order alternates)."""
        return [(self.save_state, self.state_get), (self.load_state, self.state_set),
                (self.step, self.restore_step)]

    def finish(self, engine_tokens):
        """Restore once more, continue greedily, compare; a flat dict of ``llama_*`` keys."""
        self.llama.load_state(self.state)
        tokens, logits = self.peer.continue_greedy(self.first_token, CONTINUE_STEPS)
        diverges = next((index for index, (left, right) in enumerate(
            zip(self.reference_tokens, tokens)) if left != right), None)
        ours = [self.first_token] + self.reference_tokens
        agree = next((index for index, (left, right) in enumerate(zip(ours, engine_tokens))
                      if left != right), min(len(ours), len(engine_tokens)))
        samples = self.samples
        result = {key: median(values) for key, values in samples.items()}
        result.update({f'{key}_min': min(values) for key, values in samples.items()})
        result.update({
            'llama_prefill_s': self.prefill_s,
            'llama_prefill_tok_s': self.context / self.prefill_s,
            'llama_state_bytes': self.state_bytes,
            'llama_seq_rm_rollback': self.seq_rm_accepted,
            'llama_continues_identically': diverges is None,
            'llama_diverges_at': diverges, 'llama_continue_steps': len(tokens),
            'llama_logits_max_diff': float(np.abs(logits - self.reference_logits).max()),
            'llama_engine_agree': agree, 'llama_engine_compared': len(engine_tokens),
            'llama_first_token': self.first_token,
            'llama_reference_tokens': self.reference_tokens, 'llama_restored_tokens': tokens,
            'llama_samples': samples})
        return result


# -- measurements ---------------------------------------------------------------------------


def measure_context(engine, family, context, rounds, peer=None):
    """Every measurement of one family at one context (and of ``peer``); a flat dict."""
    from capsule_ros.runtime.state import sequence_range

    started_all = time.monotonic()
    load_before = os.getloadavg()[0]
    label = f'ctx{context}'
    main = engine.create_session(system_prompt=False)
    live = engine._sessions[main]
    layout = engine.layout
    shared_names = engine.residency.overwritten_names  # conv, recurrent
    fixed_names = [spec.name for spec in layout.fixed_specs]

    log(f'{family} @ {context}: cold prefill ...')
    started = time.perf_counter()
    engine.append(main, tokens=random_tokens(context, context))
    prefill_s = time.perf_counter() - started
    info = engine.snapshot(main, label)
    capsule = engine.capsule(label)
    cold_first_token_s = engine.generate(main, 1, reply=False).first_token_s
    log(f'{family} @ {context}: prefill {prefill_s:.2f} s ({context / prefill_s:.0f} tok/s); '
        f'capsule kv {info.kv_bytes / 2 ** 20:.1f} MiB, conv {info.conv_bytes / 2 ** 10:.0f} '
        f'KiB, recurrent {info.recurrent_bytes / 2 ** 20:.1f} MiB, meta '
        f'{info.meta_bytes / 2 ** 10:.0f} KiB')
    llama = LlamaMeasurement(peer, family, context) if peer else None

    def step():
        engine.generate(main, 1, reply=False)

    samples = {key: [] for key in (
        'decode_ms', 'snapshot_ms', 'copy_at_snapshot_ms', 'step_ms', 'cow_step_ms', 'rollback_ms',
        'raw_state_copy_ms', 'raw_fixed_copy_ms', 'restore_other_ms', 'raw_copy_other_ms',
        'raw_copy_other_kv_ms', 'ttft_restore_ms')}
    rollback_copied = []
    other_copied = []
    state_targets = {name: torch.empty_like(capsule.fixed[name]) for name in shared_names}
    fixed_targets = {name: torch.empty_like(capsule.fixed[name]) for name in fixed_names}
    raw_other_bytes = (layout.sequence_bytes(context)
                       + sum(tensor.numel() * tensor.element_size()
                             for tensor in fixed_targets.values()))

    def decode():
        step()  # the first step after a restore allocates the fresh conv/recurrent tensors
        started = time.perf_counter()
        result = engine.generate(main, DECODE_STEPS, reply=False)
        samples['decode_ms'].append(ms_since(started) / len(result.token_ids))

    def snapshot_once():
        step()
        settle()
        started = time.perf_counter()
        engine.snapshot(main, 'probe')
        engine.release('probe')
        samples['snapshot_ms'].append(ms_since(started))

    def copy_at_snapshot():
        step()
        buffers = live.slot.buffers
        settle()
        started = time.perf_counter()
        copies = {name: buffers[name].clone() for name in shared_names}
        samples['copy_at_snapshot_ms'].append(ms_since(started))
        del copies

    def plain_step():
        step()  # the slot owns its conv/recurrent tensors again: no copy-on-write pending
        settle()
        started = time.perf_counter()
        step()
        samples['step_ms'].append(ms_since(started))

    def step_after_snapshot():
        step()
        engine.snapshot(main, 'probe')
        settle()
        started = time.perf_counter()
        step()
        samples['cow_step_ms'].append(ms_since(started))
        engine.release('probe')

    def rollback():
        step()
        settle()
        started = time.perf_counter()
        result = engine.restore(label)
        samples['rollback_ms'].append(ms_since(started))
        rollback_copied.append(result.copied_bytes)

    def raw_state_copy():
        step()
        settle()
        started = time.perf_counter()
        for name in shared_names:
            state_targets[name].copy_(capsule.fixed[name])
        samples['raw_state_copy_ms'].append(ms_since(started))

    def raw_fixed_copy():
        step()
        settle()
        started = time.perf_counter()
        for name in fixed_names:
            fixed_targets[name].copy_(capsule.fixed[name])
        samples['raw_fixed_copy_ms'].append(ms_since(started))

    def restore_other():
        step()
        other = engine.create_session(system_prompt=False)
        settle()
        started = time.perf_counter()
        result = engine.restore(label, other)
        elapsed = ms_since(started)
        first_token_s = engine.generate(other, 1, reply=False).first_token_s
        engine.close_session(other)
        samples['restore_other_ms'].append(elapsed)
        samples['ttft_restore_ms'].append(elapsed + first_token_s * 1000)
        other_copied.append(result.copied_bytes)

    def raw_copy_other():
        # the same bytes a restore into a fresh slot moves (the KV range [0, context) and the
        # token journal, the non-KV state), between the same slots, after the same decode step
        step()
        other = engine.create_session(system_prompt=False)
        source = live.slot.buffers
        target = engine._sessions[other].slot.buffers
        settle()
        started = time.perf_counter()
        for spec in layout.sequence_specs:
            sequence_range(target[spec.name], spec, 0, context).copy_(
                sequence_range(source[spec.name], spec, 0, context))
        samples['raw_copy_other_kv_ms'].append(ms_since(started))  # KV + journal only
        for name in fixed_names:
            target[name].copy_(capsule.fixed[name])
        samples['raw_copy_other_ms'].append(ms_since(started))
        engine.restore(label, other)  # the slot holds the capsule's state, as above
        engine.generate(other, 1, reply=False)
        engine.close_session(other)

    pairs = [(decode,), (snapshot_once, copy_at_snapshot), (plain_step, step_after_snapshot),
             (rollback, raw_state_copy, raw_fixed_copy), (restore_other, raw_copy_other)]
    if llama:
        pairs += llama.variants()
    for index in range(rounds):
        log(f'{family} @ {context}: round {index + 1}/{rounds}')
        engine.restore(label)
        step()
        for pair in pairs:
            for variant in (pair if index % 2 == 0 else pair[::-1]):
                variant()

    log(f'{family} @ {context}: KV-only ablation ...')
    ablation = kv_only_ablation(engine, main, label)
    engine.close_session(main)
    engine.release(label)
    result = {key: median(values) for key, values in samples.items()}
    result.update({f'{key}_min': min(values) for key, values in samples.items()})
    result.update({
        'context': context, 'rounds': rounds,
        'kv_bytes': info.kv_bytes, 'conv_bytes': info.conv_bytes,
        'recurrent_bytes': info.recurrent_bytes, 'mtp_bytes': info.mtp_bytes,
        'meta_bytes': info.meta_bytes, 'state_bytes': info.state_bytes,
        'shared_state_bytes': sum(tensor.numel() * tensor.element_size()
                                  for tensor in state_targets.values()),
        'prefill_s': prefill_s, 'prefill_tok_s': context / prefill_s,
        'cold_first_token_ms': cold_first_token_s * 1000,
        'cold_ttft_ms': (prefill_s + cold_first_token_s) * 1000,
        'decode_tok_s': 1000 / result['decode_ms'],
        'cow_extra_ms': result['cow_step_ms'] - result['step_ms'],
        'rollback_copied_bytes': max(rollback_copied),
        'restore_copied_bytes': median(other_copied), 'raw_copy_other_bytes': raw_other_bytes,
        'rollback_ratio': result['rollback_ms'] / result['raw_state_copy_ms'],
        'restore_ratio': result['restore_other_ms'] / result['raw_copy_other_ms'],
        'ttft_speedup': (prefill_s + cold_first_token_s) * 1000 / result['ttft_restore_ms'],
        'samples': samples,
    })
    result.update(ablation)
    if llama:
        result.update(llama.finish(ablation['reference_tokens']))
    # the cold prefills (ours and the peer's) grow faster with the context than the rest
    result['other_s'] = (time.monotonic() - started_all - prefill_s
                         - result.get('llama_prefill_s', 0.0))
    result['load_average'] = [load_before, os.getloadavg()[0]]
    log(f'{family} @ {context}: snapshot {result["snapshot_ms"]:.3f} ms (clone at snapshot '
        f'{result["copy_at_snapshot_ms"]:.3f} ms), rollback {result["rollback_ms"]:.3f} ms vs '
        f'raw {result["raw_state_copy_ms"]:.3f} ms, restore other '
        f'{result["restore_other_ms"]:.2f} ms vs raw {result["raw_copy_other_ms"]:.2f} ms, '
        f'KV-only diverges at {result["kv_only_diverges_at"]}, full restore identical '
        f'{result["full_restore_identical"]} ({time.monotonic() - started_all:.0f} s)')
    if llama:
        log(f'{family} @ {context}: llama.cpp save_state {result["llama_save_state_ms"]:.2f} ms '
            f'(get_data {result["llama_state_get_ms"]:.2f} ms), load_state '
            f'{result["llama_load_state_ms"]:.2f} ms (set_data '
            f'{result["llama_state_set_ms"]:.2f} ms), continues identically '
            f'{result["llama_continues_identically"]}, greedy tokens equal to ours for '
            f'{result["llama_engine_agree"]}/{result["llama_engine_compared"]}')
    return result


def kv_only_ablation(engine, session, label):
    """
    Continue greedily, then rewind only position and last logits and continue again.

    The conv/recurrent state stays at the end of the first continuation: what a KV-only
    capsule of a hybrid model restores. A full restore must then continue identically.
    """
    capsule = engine.capsule(label)
    live = engine._sessions[session]
    engine.restore(label)
    reference = list(engine.generate(session, ABLATION_STEPS, reply=False).token_ids)
    live.position = capsule.position
    live.slot.buffers['last_logits'].copy_(capsule.fixed['last_logits'])
    kv_only = list(engine.generate(session, ABLATION_STEPS, reply=False).token_ids)
    engine.restore(label)
    full = list(engine.generate(session, ABLATION_STEPS, reply=False).token_ids)
    diverges = next((index for index, (left, right) in enumerate(zip(reference, kv_only))
                     if left != right), None)
    if diverges is None and len(reference) != len(kv_only):
        diverges = min(len(reference), len(kv_only))
    return {'kv_only_diverges_at': diverges,
            'kv_only_differing': sum(left != right for left, right in zip(reference, kv_only))
            + abs(len(reference) - len(kv_only)),
            'full_restore_identical': full == reference, 'ablation_tokens': len(reference),
            'reference_tokens': reference, 'kv_only_tokens': kv_only}


# -- the time budget --------------------------------------------------------------------------


def estimate(measured, context):
    """(prefill s, rest s) at ``context`` from the contexts measured so far."""
    points = sorted((row['context'], row['prefill_s'] + row.get('llama_prefill_s', 0.0),
                     row['other_s']) for row in measured)
    last_context, last_prefill, last_other = points[-1]
    exponent = 1.2  # prefill grows a little faster than the context (attention)
    if len(points) >= 2:
        first_context, first_prefill, _ = points[-2]
        exponent = math.log(last_prefill / first_prefill) / math.log(last_context / first_context)
        exponent = min(max(exponent, 1.0), 2.0)
    scale = context / last_context
    return last_prefill * scale ** exponent, last_other * max(1.0, scale ** 0.5)


def plan_fits(plan, measured, deadline, budget_min, left_out):
    """Drop the costliest planned contexts until the estimated rest fits the budget."""
    while True:
        estimates = {(family, context): estimate(measured[family], context)
                     for family, context in plan if measured[family]}
        remaining = deadline - time.monotonic()
        total = sum(sum(value) for value in estimates.values())
        if total <= remaining or not estimates:
            return plan
        family, context = max(estimates, key=lambda item: sum(estimates[item]))
        prefill_s, other_s = estimates[family, context]
        reason = (f'cold prefill estimated at {prefill_s:.0f} s (+ {other_s:.0f} s of verbs), '
                  f'extrapolated from {", ".join(str(row["context"]) for row in measured[family])}'
                  f'; the contexts still planned need about {total:.0f} s, {remaining:.0f} s '
                  f'are left of the {budget_min:g}-minute budget')
        log(f'{family} @ {context}: left out: {reason}')
        left_out[family][str(context)] = reason
        plan = [item for item in plan if item != (family, context)]


# -- report -------------------------------------------------------------------------------------


def fmt_ms(value):
    """Milliseconds with about 3 significant digits, or a dash."""
    if value is None:
        return '-'
    if abs(value) < 1:
        return f'{value:.3f}'
    return f'{value:.2f}' if abs(value) < 100 else f'{value:.0f}'


def fmt_bytes(value):
    """Bytes as KiB or MiB, or a dash."""
    if value is None:
        return '-'
    return f'{value / 2 ** 20:.2f} MiB' if value >= 2 ** 20 else f'{value / 2 ** 10:.1f} KiB'


def fmt_ratio(value):
    """Format a ratio as '1.23x', or a dash."""
    return '-' if value is None else f'{value:.2f}x'


def llama_continuation_detail(row):
    """Describe the peer's greedy tokens and logits after load_state vs uninterrupted."""
    difference = row['llama_logits_max_diff']
    logits = ('logits bitwise equal' if difference == 0
              else f'max logit difference {difference:.3g}')
    steps = row['llama_continue_steps']
    if row['llama_continues_identically']:
        return f'{steps}/{steps} tokens equal, {logits}'
    return f'token {row["llama_diverges_at"]} of {steps} differs, {logits}'


def llama_continuation(row):
    """Return 'yes (...)' or 'NO (...)' for the table, or a dash."""
    if 'llama_continues_identically' not in row:
        return '-'
    answer = 'yes' if row['llama_continues_identically'] else 'NO'
    return f'{answer} ({llama_continuation_detail(row)})'


ROWS = [
    ('capsule KV bytes', 'kv_bytes', fmt_bytes),
    ('capsule conv bytes', 'conv_bytes', fmt_bytes),
    ('capsule recurrent bytes', 'recurrent_bytes', fmt_bytes),
    ('capsule meta bytes (journal, logits, RNG, sampler)', 'meta_bytes', fmt_bytes),
    ('snapshot + release, copy-on-write (ms)', 'snapshot_ms', fmt_ms),
    ('copy at snapshot: clone conv + recurrent (ms)', 'copy_at_snapshot_ms', fmt_ms),
    ('decode step (ms)', 'step_ms', fmt_ms),
    ('decode step right after a snapshot (ms)', 'cow_step_ms', fmt_ms),
    ('copy-on-write cost in that step (ms)', 'cow_extra_ms', fmt_ms),
    ('rollback in place (ms)', 'rollback_ms', fmt_ms),
    ('raw copy of conv + recurrent (ms)', 'raw_state_copy_ms', fmt_ms),
    ('rollback / raw copy', 'rollback_ratio', fmt_ratio),
    ('raw copy of all non-KV state, meta included (ms)', 'raw_fixed_copy_ms', fmt_ms),
    ('restore into another session (ms)', 'restore_other_ms', fmt_ms),
    ('raw copy of the same bytes into that slot (ms)', 'raw_copy_other_ms', fmt_ms),
    ('  of which KV + journal (ms)', 'raw_copy_other_kv_ms', fmt_ms),
    ('restore / raw copy', 'restore_ratio', fmt_ratio),
    ('minima of the rounds: snapshot / rollback / restore into another session (ms)', None,
     lambda row: ' / '.join(fmt_ms(row.get(f'{key}_min')) for key in (
         'snapshot_ms', 'rollback_ms', 'restore_other_ms'))),
    ('minima of the rounds: rollback / raw copy, restore / raw copy', None,
     lambda row: ', '.join(fmt_ratio(min_ratio(row, ours, raw)) for ours, raw in (
         ('rollback_ms', 'raw_state_copy_ms'), ('restore_other_ms', 'raw_copy_other_ms')))),
    ('bytes restore copied / raw copy moved', None,
     lambda row: f'{fmt_bytes(row["restore_copied_bytes"])} / '
                 f'{fmt_bytes(row["raw_copy_other_bytes"])}'),
    ('TTFT cold: prefill + first token (ms)', 'cold_ttft_ms', lambda value: f'{value:.0f}'),
    ('TTFT restored: restore + first token (ms)', 'ttft_restore_ms', fmt_ms),
    ('TTFT speed-up', 'ttft_speedup', lambda value: f'{value:.0f}x'),
    ('prefill (tok/s)', 'prefill_tok_s', lambda value: f'{value:.0f}'),
    ('decode (tok/s)', 'decode_tok_s', lambda value: f'{value:.1f}'),
    ('KV-only restore: greedy tokens diverge at', None,
     lambda row: ('never' if row['kv_only_diverges_at'] is None else
                  f'token {row["kv_only_diverges_at"]} ({row["kv_only_differing"]}/'
                  f'{row["ablation_tokens"]} differ)')),
    ('full restore continues identically', 'full_restore_identical',
     lambda value: 'yes' if value else 'NO'),
    ('1-minute load average of the machine before / after', 'load_average',
     lambda value: f'{value[0]:.1f} / {value[1]:.1f}'),
]
# the llama.cpp peer's rows, shown where a context has them
LLAMA_ROWS = [
    ('llama.cpp peer: cold prefill, eval of the context (ms)', 'llama_prefill_s',
     lambda value: f'{value * 1000:.0f}'),
    ('llama.cpp peer: prefill (tok/s)', 'llama_prefill_tok_s', lambda value: f'{value:.0f}'),
    ('llama.cpp peer: decode step (ms)', 'llama_step_ms', fmt_ms),
    ('llama.cpp peer: state bytes (KV cells + conv + recurrent)', 'llama_state_bytes',
     fmt_bytes),
    ('llama.cpp peer: save_state, llama-cpp-python (ms)', 'llama_save_state_ms', fmt_ms),
    ('  of which llama_state_get_data into a buffer (ms)', 'llama_state_get_ms', fmt_ms),
    ('llama.cpp peer: load_state = rollback in the same context (ms)', 'llama_load_state_ms',
     fmt_ms),
    ('  of which llama_state_set_data (ms)', 'llama_state_set_ms', fmt_ms),
    ('llama.cpp peer: load_state + decode of the kept token (ms)', 'llama_restore_step_ms',
     fmt_ms),
    ('llama.cpp peer: rollback in place by seq_rm (no saved state)', 'llama_seq_rm_rollback',
     lambda value: 'accepted' if value else 'refused'),
    ('llama.cpp peer: load_state continues identically', None, llama_continuation),
    ("llama.cpp peer: greedy tokens equal to this engine's (leading)", None,
     lambda row: '-' if 'llama_engine_agree' not in row else
     f'{row["llama_engine_agree"]}/{row["llama_engine_compared"]}'),
]


def columns(results):
    """(family, context, row) for every measured context, in the order of the run."""
    return [(family, int(context), row) for family, data in results['families'].items()
            for context, row in sorted(data['contexts'].items(), key=lambda item: int(item[0]))]


def table(results):
    """Markdown table: rows = metrics, columns = family x context."""
    cols = columns(results)
    header = '| metric | ' + ' | '.join(
        f'{MODELS[family]["title"]} @ {context}' for family, context, _ in cols) + ' |'
    lines = [header, '|---' * (1 + len(cols)) + '|']
    rows = ROWS
    if any('llama_continues_identically' in row for _, _, row in cols):
        rows = ROWS[:-1] + LLAMA_ROWS + ROWS[-1:]  # the load average stays last
    for title, key, formatter in rows:
        cells = []
        for _, _, row in cols:
            value = row if key is None else row.get(key)
            cells.append('-' if value is None and key is not None else formatter(value))
        lines.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def verdict(value, limit):
    """Return 'met' or 'missed'."""
    return 'met' if value <= limit else 'missed'


def min_ratio(row, ours, raw):
    """Ratio of the minima of the rounds (None for rows without minima)."""
    if f'{ours}_min' not in row:
        return None
    return row[f'{ours}_min'] / row[f'{raw}_min']


def targets(results):
    """One line per target: met or missed on the medians, with the minima of the rounds."""
    lines = []
    for family, data in results['families'].items():
        rows = sorted(data['contexts'].values(), key=lambda row: row['context'])
        if not rows:
            continue
        title = MODELS[family]['title']
        largest = rows[-1]
        snapshot = largest['snapshot_ms']
        lines.append(f'- {title}: snapshot <= {SNAPSHOT_TARGET_MS:g} ms at the largest context '
                     f'({largest["context"]}): **{verdict(snapshot, SNAPSHOT_TARGET_MS)}** '
                     f'(median {snapshot:.3f} ms, minimum {largest["snapshot_ms_min"]:.3f} ms)')
        if len(rows) > 1:
            medians = [row['snapshot_ms'] for row in rows]
            minima = [row['snapshot_ms_min'] for row in rows]
            flat = max(medians) / min(medians)
            flat_min = max(minima) / min(minima)
            lines.append(
                f'- {title}: snapshot flat in context (slowest context <= {FLAT_RATIO:g}x the '
                f'fastest): **{verdict(flat, FLAT_RATIO)}** '
                '(medians ' + ', '.join(f'{row["context"]}: {row["snapshot_ms"]:.3f} ms'
                                        for row in rows)
                + f', {flat:.2f}x; minima {flat_min:.2f}x, {verdict(flat_min, FLAT_RATIO)})')
        for row in rows:
            for what, ours, raw in (
                    ('rollback in place', 'rollback_ms', 'raw_state_copy_ms'),
                    ('restore into another session', 'restore_other_ms', 'raw_copy_other_ms')):
                ratio = row[ours] / row[raw]
                line = (f'- {title} @ {row["context"]}: {what} <= {TARGET_RATIO:g}x raw copy: '
                        f'**{verdict(ratio, TARGET_RATIO)}** (medians {row[ours]:.3f} ms vs '
                        f'{row[raw]:.3f} ms, {ratio:.2f}x')
                ratio_min = min_ratio(row, ours, raw)
                if ratio_min is not None:
                    line += (f'; minima of the rounds {row[ours + "_min"]:.3f} ms vs '
                             f'{row[raw + "_min"]:.3f} ms, {ratio_min:.2f}x, '
                             f'{verdict(ratio_min, TARGET_RATIO)}')
                lines.append(line + ')')
            if 'llama_continues_identically' in row:
                lines.append(llama_line(title, row))
    return '\n'.join(lines) + '\n'


def llama_line(title, row):
    """Describe the llama.cpp peer at one context: restores identically?, rollback, save."""
    answer = 'yes' if row['llama_continues_identically'] else 'NO'
    capsule_bytes = row['kv_bytes'] + row['state_bytes']
    ours = "this engine's"
    return (f'- {title} @ {row["context"]}: llama.cpp (same weights) continues identically '
            f'after load_state: **{answer}** ({llama_continuation_detail(row)}); rollback: '
            f'load_state {fmt_ms(row["llama_load_state_ms"])} ms '
            f'(llama_state_set_data {fmt_ms(row["llama_state_set_ms"])} ms) vs {ours} '
            f'rollback {fmt_ms(row["rollback_ms"])} ms '
            f'({row["llama_load_state_ms"] / row["rollback_ms"]:.0f}x); save: save_state '
            f'{fmt_ms(row["llama_save_state_ms"])} ms (llama_state_get_data '
            f'{fmt_ms(row["llama_state_get_ms"])} ms) vs snapshot {fmt_ms(row["snapshot_ms"])} '
            f'ms; state {fmt_bytes(row["llama_state_bytes"])} vs capsule '
            f'{fmt_bytes(capsule_bytes)}; in-place rollback by seq_rm '
            f'{"accepted" if row["llama_seq_rm_rollback"] else "refused"}')


def runs(results):
    """Describe the run(s) the results come from."""
    later = results.get('runs', [])[1:]
    if not later:
        return 'the run'
    return 'the run and ' + ', '.join(
        f'a rerun of {" ".join(run["families"])} @ {" ".join(map(str, run["contexts"]))} '
        f'(merged)' for run in later) + ' together'


def llama_settings(llamacpp):
    """Describe how the llama.cpp peer ran, or why it did not."""
    if not llamacpp:
        return 'llama.cpp peer: not part of this run.'
    if llamacpp.get('skipped'):
        return f'llama.cpp peer: skipped ({llamacpp["skipped"]}).'
    return (
        f'llama.cpp peer: llama-cpp-python {llamacpp["version"]} on the same random weights, '
        f'written as a {llamacpp["dtype"]} GGUF by `bench/gguf_export.py` (its `--check` '
        f'compares llama.cpp with transformers in fp32); n_ctx {llamacpp["n_ctx"]}, n_batch '
        f'{llamacpp["n_batch"]}, {llamacpp["threads"]} threads, logits_all off; timed in the '
        f'same interleaved rounds (each call after a decode step and the same pause). Its '
        f'state holds the KV cells and the conv/recurrent state but no logits, so the caller '
        f'keeps the token it sampled from the prefill\'s last logits: "continues identically" '
        f'restores the state saved right after the prefill (into the same context, after the '
        f'rounds evaluated other tokens), feeds that token and compares the next '
        f'{llamacpp["continue_steps"]} greedy tokens and their logits with the run that never '
        f"saved or loaded. The peer calls eval itself: llama-cpp-python 0.3.36's generate() "
        f"after a load_state replays the last prompt token through seq_rm, which a hybrid's "
        f'recurrent memory refuses, and then evaluates the whole prompt again. '
        f"save_state and load_state are llama-cpp-python's: they also copy "
        f'its logits array (n_batch x vocabulary floats) and the state bytes once more; the C '
        f"calls under them are timed alone. llama.cpp's cheap rollback, seq_rm of the "
        f'positions after the context, is tried once (n_rs_seq 0, the default).')


def report(results):
    """Return the markdown report: settings, table, targets, left-out contexts."""
    settings = results['settings']
    lines = ['# Capsules on hybrid models at real size (random weights)', '',
             f'bf16, dense weights, {settings["threads"]} threads, CPU; random token ids below '
             f'{VOCAB_HIGH}; medians of {settings["rounds"]} interleaved rounds for the ms-scale '
             f'verbs (each timed verb and raw copy follows a decode step and a '
             f'{SETTLE_S * 1000:.0f} ms pause that lets the OpenMP workers sleep), '
             f'decode: median over {DECODE_STEPS}-step runs; cold prefill once per context; '
             f'torch {settings["torch"]}; {runs(results)} took '
             f'{results["elapsed_s"] / 60:.1f} min '
             f'(model loading included, checkpoint and GGUF writing not). The machine is '
             f'shared: its load average is in the last row; the minimum of the rounds of every '
             f'timed verb is in the JSON (`*_min`) and, for the verbs compared, in the table.',
             '']
    lines += [llama_settings(settings.get('llamacpp')), '']
    for family, data in results['families'].items():
        model = data['model']
        line = (f'- {MODELS[family]["title"]}: {model["parameters"] / 1e6:.0f} M parameters '
                f'(MLP width {model["mlp_width"]}), slot of {model["slot_mib"]:.0f} MiB at '
                f'max_seq_len {model["max_seq_len"]}, loaded in {model["load_s"]:.0f} s')
        if 'gguf' in model:
            line += (f'; GGUF of {fmt_bytes(model["gguf"]["bytes"])} loaded by llama.cpp in '
                     f'{model["gguf"]["load_s"]:.0f} s')
        lines.append(line)
    lines += ['', table(results), '## Targets', '', targets(results)]
    left_out = [(family, context, reason) for family, data in results['families'].items()
                for context, reason in data['left_out'].items()]
    if left_out:
        lines += ['## Contexts left out', '']
        lines += [f'- {MODELS[family]["title"]} @ {context}: {reason}'
                  for family, context, reason in left_out]
        lines.append('')
    return '\n'.join(lines)


def plot(results, path):
    """PNG: verb latencies vs raw copies per family, and TTFT cold vs restored (log scales)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    families = [family for family, data in results['families'].items() if data['contexts']]
    figure, axes = plt.subplots(1, len(families) + 1, figsize=(6.5 * (len(families) + 1), 5))
    # a verb (solid) and the copy it is compared with (dotted) share a colour
    lines = [('snapshot_ms', 'snapshot (copy-on-write)', 'o-', 'C0'),
             ('copy_at_snapshot_ms', 'copy at snapshot (clone conv + recurrent)', 'o:', 'C0'),
             ('rollback_ms', 'rollback in place', 'd-', 'C1'),
             ('raw_state_copy_ms', 'raw copy of conv + recurrent', 'd:', 'C1'),
             ('restore_other_ms', 'restore into another session', 'x-', 'C2'),
             ('raw_copy_other_ms', 'raw copy of the same bytes', 'x:', 'C2'),
             ('step_ms', 'decode step', 's:', 'C3'),
             ('cow_step_ms', 'decode step after a snapshot', 's-', 'C3'),
             ('llama_load_state_ms', 'llama.cpp load_state (its rollback)', '^-', 'C4'),
             ('llama_save_state_ms', 'llama.cpp save_state', 'v-', 'C5')]
    for axis, family in zip(axes, families):
        rows = sorted(results['families'][family]['contexts'].values(),
                      key=lambda row: row['context'])
        contexts = [row['context'] for row in rows]
        for key, label, style, colour in lines:
            if all(key in row for row in rows):  # runs without the llama.cpp peer lack some
                axis.plot(contexts, [row[key] for row in rows], style, color=colour,
                          label=label)
        axis.set(xscale='log', yscale='log', xlabel='context tokens', ylabel='ms (median)',
                 title=f'{MODELS[family]["title"]}: capsule verbs vs raw copies')
        axis.set_xticks(contexts, [str(context) for context in contexts])
        axis.tick_params(axis='x', which='minor', labelbottom=False)
        axis.legend(fontsize=7)
    axis = axes[-1]
    for family, style, colour in zip(families, ('o', 's', '^'), ('C0', 'C1', 'C2')):
        rows = sorted(results['families'][family]['contexts'].values(),
                      key=lambda row: row['context'])
        contexts = [row['context'] for row in rows]
        title = MODELS[family]['title']
        axis.plot(contexts, [row['cold_ttft_ms'] for row in rows], f'{style}--', color=colour,
                  label=f'{title}: cold prefill + first token')
        axis.plot(contexts, [row['ttft_restore_ms'] for row in rows], f'{style}-', color=colour,
                  label=f'{title}: restore + first token')
        if all('llama_prefill_s' in row for row in rows):
            axis.plot(contexts, [row['llama_prefill_s'] * 1000 for row in rows], f'{style}:',
                      color=colour, label=f'{title}: llama.cpp cold prefill')
            axis.plot(contexts, [row['llama_restore_step_ms'] for row in rows], f'{style}-.',
                      color=colour, label=f'{title}: llama.cpp load_state + one decode step')
    axis.set(xscale='log', yscale='log', xlabel='context tokens', ylabel='ms',
             title='Time to first token: cold vs restored')
    every = sorted({int(context) for family in families
                    for context in results['families'][family]['contexts']})
    axis.set_xticks(every, [str(context) for context in every])
    axis.tick_params(axis='x', which='minor', labelbottom=False)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- main -------------------------------------------------------------------------------------


def run(arguments):
    """Write/load the models, measure every planned context, return the results."""
    started = time.monotonic()
    contexts = sorted(set(arguments.contexts))
    rounds = arguments.rounds or (QUICK_ROUNDS if arguments.quick else ROUNDS)
    directories = {family: model_dir(family) for family in arguments.families}
    llamacpp = {'skipped': ('--no-llamacpp given' if arguments.no_llamacpp
                            else llamacpp_missing())}
    if llamacpp['skipped']:
        log(f'llama.cpp peer skipped: {llamacpp["skipped"]}')
        ggufs = {}
    else:
        ggufs = {family: gguf_model(family, directories[family])
                 for family in arguments.families}
    writing_s = time.monotonic() - started
    deadline = started + writing_s + arguments.budget_minutes * 60
    max_seq_len = arguments.max_seq_len or max(contexts) + 256
    if ggufs:
        import llama_cpp
        llamacpp.update({'version': llama_cpp.__version__, 'dtype': LLAMA_DTYPE,
                         'n_ctx': max_seq_len, 'n_batch': LLAMA_BATCH, 'threads': THREADS,
                         'continue_steps': CONTINUE_STEPS})
    results = {'settings': {'contexts': contexts, 'rounds': rounds, 'threads': THREADS,
                            'torch': torch.__version__, 'quick': arguments.quick,
                            'budget_minutes': arguments.budget_minutes,
                            'weight_gain': WEIGHT_GAIN, 'llamacpp': llamacpp},
               'families': {}}
    engines = {}
    peers = {}
    capsule_dir = Path(tempfile.mkdtemp(prefix='capsule-hybrids-'))
    try:
        for family in arguments.families:
            log(f'{family}: loading {directories[family]} (max_seq_len {max_seq_len}) ...')
            load_started = time.monotonic()
            engines[family] = make_engine(family, directories[family], max_seq_len,
                                          capsule_dir / family)
            model = describe_model(directories[family])
            model.update({'name': MODELS[family]['name'], 'max_seq_len': max_seq_len,
                          'load_s': time.monotonic() - load_started,
                          'slot_mib': engines[family].layout.slot_bytes() / 2 ** 20,
                          'config': MODELS[family]['config']})
            log(f'{family}: {model["parameters"] / 1e6:.0f} M parameters, MLP width '
                f'{model["mlp_width"]}')
            if family in ggufs:
                log(f'{family}: loading {ggufs[family]} into llama.cpp (n_ctx {max_seq_len}) ...')
                load_started = time.monotonic()
                peers[family] = LlamaPeer(ggufs[family], max_seq_len)
                model['gguf'] = {'path': str(ggufs[family]),
                                 'bytes': ggufs[family].stat().st_size,
                                 'load_s': time.monotonic() - load_started}
            results['families'][family] = {'model': model, 'contexts': {}, 'left_out': {}}
        # smallest contexts of every family first, then estimate the rest against the budget
        plan = [(family, context) for context in contexts for family in arguments.families]
        measured = {family: [] for family in arguments.families}
        left_out = {family: results['families'][family]['left_out']
                    for family in arguments.families}
        while plan:
            plan = plan_fits(plan, measured, deadline, arguments.budget_minutes, left_out)
            if not plan:
                break
            family, context = plan.pop(0)
            if measured[family]:
                prefill_s, other_s = estimate(measured[family], context)
                log(f'{family} @ {context}: estimated cold prefill {prefill_s:.0f} s + '
                    f'{other_s:.0f} s of verbs; {deadline - time.monotonic():.0f} s left')
            row = measure_context(engines[family], family, context, rounds,
                                  peers.get(family))
            measured[family].append(row)
            results['families'][family]['contexts'][str(context)] = row
    finally:
        for peer in peers.values():
            peer.llama.close()
        shutil.rmtree(capsule_dir, ignore_errors=True)
    results['elapsed_s'] = time.monotonic() - started - writing_s
    results['writing_s'] = writing_s
    return results


def merge(old, new):
    """Replace in ``old`` the contexts ``new`` measured; keep the rest of ``old``."""
    for family, data in new['families'].items():
        kept = old['families'].setdefault(family, data)
        if kept is data:
            continue
        kept['model'] = data['model']
        for context, row in data['contexts'].items():
            kept['contexts'][context] = row
            kept['left_out'].pop(context, None)
        for context, reason in data['left_out'].items():
            if context not in kept['contexts']:
                kept['left_out'][context] = reason
    if not (old['settings'].get('llamacpp') or {}).get('version'):
        old['settings']['llamacpp'] = new['settings'].get('llamacpp')  # the peer ran only now
    first = {'families': list(old['families']), 'contexts': old['settings']['contexts'],
             'elapsed_s': old['elapsed_s']}
    old['runs'] = old.get('runs', [first]) + new['runs']
    old['elapsed_s'] = sum(run['elapsed_s'] for run in old['runs'])
    return old


def main():
    """Measure (or reread the JSON), print the table, write JSON, markdown and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--contexts', type=int, nargs='+', default=[512, 2048, 8000])
    parser.add_argument('--families', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke run: contexts {QUICK_CONTEXTS}, {QUICK_ROUNDS} rounds')
    parser.add_argument('--rounds', type=int, default=0,
                        help=f'interleaved rounds per context (default {ROUNDS})')
    parser.add_argument('--budget-minutes', type=float, default=20.0,
                        help='leave out contexts whose estimated cold prefill would push the '
                             'run past this (checkpoint writing not counted)')
    parser.add_argument('--report-only', action='store_true',
                        help='measure nothing: rewrite the table and plot from the JSON')
    parser.add_argument('--max-seq-len', type=int, default=0,
                        help='engine.max_seq_len (default: the largest context + 256; give the '
                             "first run's with --merge for the same slot layout)")
    parser.add_argument('--no-llamacpp', action='store_true',
                        help='leave out the llama.cpp peer (run where llama-cpp-python is '
                             'installed)')
    parser.add_argument('--merge', action='store_true',
                        help='measure the given families and contexts again and replace them '
                             'in the existing JSON (e.g. a context a load spike spoiled)')
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.contexts = QUICK_CONTEXTS
    torch.set_num_threads(THREADS)
    output_dir = Path(arguments.out)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = 'hybrids-quick' if arguments.quick else 'hybrids'
    if arguments.report_only:
        results = json.loads((output_dir / f'{stem}.json').read_text())
    else:
        results = run(arguments)
        results['runs'] = [{'families': arguments.families, 'contexts': arguments.contexts,
                            'elapsed_s': results['elapsed_s'],
                            'finished': time.strftime('%Y-%m-%d %H:%M:%S')}]
        if arguments.merge:
            results = merge(json.loads((output_dir / f'{stem}.json').read_text()), results)
        (output_dir / f'{stem}.json').write_text(json.dumps(results, indent=1))
    text = report(results)
    (output_dir / f'{stem}.md').write_text(text)
    plot(results, output_dir / f'{stem}.png')
    print(text)
    print(f'written: {output_dir}/{stem}.json, {stem}.md, {stem}.png')


if __name__ == '__main__':
    main()
