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
One benchmark peer per process: this engine, transformers, llama.cpp.

Run by ``bench/run_all.py`` (``make bench``); each call measures one peer at the given
contexts and writes a JSON file. Random token ids from the middle of the vocabulary, 2 threads,
as in DESIGN.md's baselines.
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch

VOCAB_LOW, VOCAB_HIGH = 1000, 20000
DECODE_STEPS = 16
REPEATS = 20


def log(line):
    """Print progress on stderr (stdout stays clean)."""
    print(f'[bench] {line}', file=sys.stderr, flush=True)


def random_tokens(count, seed):
    """Return reproducible token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB_LOW, VOCAB_HIGH, (count,), generator=generator).tolist()


def median_ms(function, repeats=REPEATS):
    """Return the median wall time of ``function()`` in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def make_engine(dtype, quantization, backend, max_seq_len):
    """Engine on the default model with room for 10 sessions of ``max_seq_len`` tokens."""
    from capsule_ros.runtime.config import PolicyConfig
    from capsule_ros.runtime.engine import PolicyEngine
    return PolicyEngine(PolicyConfig.from_dict({
        'model': {'dtype': dtype, 'quantization': quantization},
        'backend': {'kind': backend, 'device': 'cuda' if backend == 'tensorrt' else 'cpu'},
        'engine': {'max_seq_len': max_seq_len, 'max_sessions': 10},
        'capsules': {'budget_bytes': 8 << 30}}))


def bench_engine(contexts, dtype, quantization='auto', backend='torch'):
    """
    Measure this engine: prefill, decode, and every capsule verb.

    The torch backend runs every context in one engine (slots of the largest); the compiled
    backends' graph reads its whole slot buffer each step, so each context gets an engine whose
    slots hold that context (plus room to decode), as a deployment would size them.
    """
    max_context = max(contexts)
    per_context = backend != 'torch'
    engine = None if per_context else make_engine(dtype, quantization, backend,
                                                  min(max_context + 256, 8192))
    results = {}
    for context in contexts:
        if per_context:
            engine = make_engine(dtype, quantization, backend, min(context + 256, 8192))
        log(f'engine {backend} {dtype}: context {context}')
        tokens = random_tokens(context, context)
        session = engine.create_session()
        started = time.perf_counter()
        engine.append(session, tokens=tokens)
        prefill_s = time.perf_counter() - started
        engine.generate(session, 2, reply=False)  # warm the decode path
        capsule_id = engine.snapshot(session, f'ctx{context}').capsule_id

        def decode_from_capsule():
            engine.restore(capsule_id)
            started = time.perf_counter()
            engine.generate(session, DECODE_STEPS, reply=False)
            return (time.perf_counter() - started) * 1000 / DECODE_STEPS
        decode_ms = statistics.median(decode_from_capsule() for _ in range(5))

        def snapshot_once():
            info = engine.snapshot(session, 'probe')
            engine.release(info.capsule_id)
        engine.restore(capsule_id)
        snapshot_ms = median_ms(snapshot_once)
        rollback_ms = median_ms(lambda: engine.restore(capsule_id))
        # restore into another (fresh) session: every segment is copied

        def restore_other():
            other = engine.create_session()
            started = time.perf_counter()
            result = engine.restore(capsule_id, other)
            elapsed = time.perf_counter() - started
            first_token = engine.generate(other, 1, reply=False).first_token_s
            engine.close_session(other)
            return elapsed, result.copied_bytes, first_token
        samples = [restore_other() for _ in range(5)]
        restore_other_ms = statistics.median(sample[0] for sample in samples) * 1000
        copied_bytes = samples[0][1]
        # TTFT after restore: restore + the first token (its logits are in the capsule)
        ttft_restore_ms = statistics.median(sample[0] + sample[2] for sample in samples) * 1000
        source = engine._sessions[session].slot.buffers['kv']

        def raw_copy_other():
            # The same bytes as restore_other moves, between the same slots, after the same
            # decode step (which streams the weights through the caches): the memory-copy
            # floor of a restore. At 512 tokens source and target fit in this CPU's L3, so a
            # copy repeated back to back (raw_copy_warm_ms) is about 3x faster than in use.
            other = engine.create_session()
            target = engine._sessions[other].slot.buffers['kv']
            started = time.perf_counter()
            target[:, :, :, :context].copy_(source[:, :, :, :context])
            elapsed = time.perf_counter() - started
            engine.restore(capsule_id, other)  # the slot holds the capsule's bytes, as above
            engine.generate(other, 1, reply=False)
            engine.close_session(other)
            return elapsed
        raw_copy_ms = statistics.median(raw_copy_other() for _ in range(5)) * 1000
        other = engine.create_session()
        target = engine._sessions[other].slot.buffers['kv']
        raw_copy_warm_ms = median_ms(
            lambda: target[:, :, :, :context].copy_(source[:, :, :, :context]), 5)

        def restore_and_step():  # what llama.cpp's load_state + eval([token]) does
            engine.restore(capsule_id, other)
            engine.generate(other, 1, reply=False)
        restore_step_ms = median_ms(restore_and_step, 5)
        # re-entry with new input: restore + 16-token observation + first token
        suffix = random_tokens(16, 7)

        def reentry():
            engine.restore(capsule_id, other)
            engine.append(other, tokens=suffix)
            engine.generate(other, 1, reply=False)
        reentry_ms = median_ms(reentry, 5)
        results[context] = {
            'prefill_s': prefill_s, 'prefill_tok_s': context / prefill_s,
            'decode_ms': decode_ms, 'decode_tok_s': 1000 / decode_ms,
            'snapshot_ms': snapshot_ms, 'rollback_ms': rollback_ms,
            'restore_other_ms': restore_other_ms, 'raw_copy_ms': raw_copy_ms,
            'raw_copy_warm_ms': raw_copy_warm_ms,
            'copied_bytes': copied_bytes, 'ttft_restore_ms': ttft_restore_ms,
            'restore_step_ms': restore_step_ms,
            'cold_ttft_ms': prefill_s * 1000, 'reentry_16_ms': reentry_ms,
        }
        engine.close_session(other)
        engine.close_session(session)
        engine.release(capsule_id)
    if not per_context:
        results['branch'] = bench_branches(engine, min(2048, max_context))
    return results


def bench_branches(engine, prefix_tokens, branches=8, new_tokens=64):
    """Measure 8 branches of a prefix, 64 new tokens each, each snapshotted: bytes, latency."""
    log(f'engine: {branches} branches of {prefix_tokens} tokens')
    session = engine.create_session()
    engine.append(session, tokens=random_tokens(prefix_tokens, 1))
    engine.snapshot(session, 'root')
    engine.close_session(session)  # the root now lives in the pool: a worst case for bytes
    started = time.perf_counter()
    children = engine.branch('root', branches)
    branch_ms = (time.perf_counter() - started) * 1000
    for index, child in enumerate(children):
        engine.append(child, tokens=random_tokens(new_tokens, 100 + index))
        engine.snapshot(child, f'leaf{index}')
    capsules = [engine.capsule(f'leaf{index}') for index in range(branches)]
    unique = {segment for capsule in capsules for segment in capsule.chain}
    stored = (sum(segment.num_bytes for segment in unique)
              + sum(capsule.fixed_bytes for capsule in capsules)
              + engine.capsule('root').fixed_bytes)
    one_full = capsules[0].sequence_bytes + capsules[0].fixed_bytes
    for child in children:
        engine.close_session(child)
    return {'prefix_tokens': prefix_tokens, 'branches': branches, 'new_tokens': new_tokens,
            'branch_ms': branch_ms, 'stored_bytes': stored, 'one_full_capsule_bytes': one_full,
            'ratio': stored / one_full}


def bench_transformers(contexts):
    """Measure transformers fp32 on the same weights: prefill, decode, deepcopy cache."""
    from transformers import LlamaForCausalLM

    from capsule_ros.runtime.loader import resolve_model

    model = LlamaForCausalLM.from_pretrained(resolve_model('').directory,
                                             dtype=torch.float32).eval()
    results = {}
    with torch.inference_mode():
        for context in contexts:
            log(f'transformers: context {context}')
            ids = torch.tensor([random_tokens(context, context)])
            started = time.perf_counter()
            output = model(ids, use_cache=True)
            prefill_s = time.perf_counter() - started
            cache = output.past_key_values
            step = torch.tensor([[5]])
            copy_ms = median_ms(lambda: copy.deepcopy(cache), 5)
            copies = [copy.deepcopy(cache) for _ in range(3)]
            times = []
            for copied in copies:
                started = time.perf_counter()
                model(step, past_key_values=copied, use_cache=True)
                times.append((time.perf_counter() - started) * 1000)
            decode_ms = statistics.median(times)

            def ttft_restored():
                model(step, past_key_values=copy.deepcopy(cache), use_cache=True)
            results[context] = {
                'prefill_s': prefill_s, 'prefill_tok_s': context / prefill_s,
                'decode_ms': decode_ms, 'decode_tok_s': 1000 / decode_ms,
                'snapshot_ms': copy_ms, 'restore_step_ms': median_ms(ttft_restored, 3),
                'cold_ttft_ms': prefill_s * 1000}
    return results


def bench_llamacpp(contexts):
    """llama.cpp (llama-cpp-python) on the same GGUF: eval, save_state, load_state."""
    from llama_cpp import Llama

    from capsule_ros.runtime.loader import bundled_model_path

    llama = Llama(model_path=str(bundled_model_path()), n_ctx=max(contexts) + 256,
                  n_threads=2, n_batch=512, verbose=False)
    results = {}
    for context in contexts:
        log(f'llama.cpp: context {context}')
        llama.reset()
        tokens = random_tokens(context, context)
        started = time.perf_counter()
        llama.eval(tokens)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        state = llama.save_state()
        save_ms = (time.perf_counter() - started) * 1000
        llama.reset()
        llama.load_state(state)  # the first call is slower; measure the next ones
        load_ms = median_ms(lambda: llama.load_state(state), 5)
        steps = []
        for _ in range(5):
            llama.load_state(state)
            started = time.perf_counter()
            llama.eval([5])
            steps.append((time.perf_counter() - started) * 1000)
        decode_ms = statistics.median(steps)

        def ttft_restored():
            llama.load_state(state)
            llama.eval([5])
        results[context] = {
            'prefill_s': prefill_s, 'prefill_tok_s': context / prefill_s,
            'decode_ms': decode_ms, 'decode_tok_s': 1000 / decode_ms,
            'snapshot_ms': save_ms, 'restore_other_ms': load_ms,
            'restore_step_ms': median_ms(ttft_restored, 5), 'cold_ttft_ms': prefill_s * 1000,
            'state_bytes': state.llama_state_size}
    return results


def main():
    """Measure one peer and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('peer', choices=['engine-bfloat16', 'engine-bfloat16-dense',
                                         'engine-float32', 'engine-onnxruntime',
                                         'engine-tensorrt', 'transformers', 'llamacpp'])
    parser.add_argument('--contexts', type=int, nargs='+', default=[512, 2048, 8000])
    parser.add_argument('--out', required=True)
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    if arguments.peer in ('engine-onnxruntime', 'engine-tensorrt'):  # the compiled graph
        results = bench_engine(arguments.contexts, 'float32', 'none',
                               arguments.peer.split('-')[1])
    elif arguments.peer.startswith('engine-'):
        # engine-bfloat16: the default (4-bit decode weights from the Q4_1 GGUF);
        # engine-bfloat16-dense: the same with model.quantization none
        dtype = arguments.peer.split('-')[1]
        quantization = 'none' if arguments.peer.endswith('-dense') else 'auto'
        results = bench_engine(arguments.contexts, dtype, quantization)
    elif arguments.peer == 'transformers':
        results = bench_transformers(arguments.contexts)
    else:
        results = bench_llamacpp(arguments.contexts)
    with open(arguments.out, 'w') as stream:
        json.dump(results, stream, indent=1)


if __name__ == '__main__':
    main()
