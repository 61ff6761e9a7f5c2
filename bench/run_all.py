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
Side-by-side benchmark of this engine against transformers and llama.cpp (``make bench``).

Each peer runs in its own process (``bench/peers.py``) on the same weights at the same
contexts, in interleaved rounds (``--rounds``, at least two; the order alternates, so a
disturbance of this noisy machine hits one round of several peers rather than every round of
one); this script takes the median of the rounds for every figure, flags figures whose rounds
differ by more than 20%, prints the tables, and writes ``bench/results/results.json``,
``summary.md`` and ``summary.png``. The backends table puts torch, onnxruntime and llama.cpp
side by side.
"""

import argparse
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time

HERE = Path(__file__).resolve().parent
PEERS = ['engine-bfloat16', 'engine-bfloat16-dense', 'engine-float32', 'engine-onnxruntime',
         'transformers', 'llamacpp']
ON_REQUEST = ['engine-tensorrt']  # only where TensorRT and a GPU are (a Jetson): --peers
SPREAD_FLAG = 0.20  # rounds of one figure differing by more than this are flagged


def run_peer(peer, contexts, output_dir, round_index=0):
    """Run one peer in a subprocess; return its results (or None if it failed)."""
    out = output_dir / f'{peer}-round{round_index + 1}.json'
    print(f'[bench] round {round_index + 1}: {peer}: contexts {contexts} ...', file=sys.stderr,
          flush=True)
    started = time.monotonic()
    command = [sys.executable, str(HERE / 'peers.py'), peer, '--out', str(out), '--contexts',
               *map(str, contexts)]
    completed = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS='2'))
    if completed.returncode != 0:
        print(f'[bench] {peer} failed (exit {completed.returncode}); left out', file=sys.stderr)
        return None
    print(f'[bench] {peer} done in {time.monotonic() - started:.0f} s', file=sys.stderr)
    return json.loads(out.read_text())


def run_service_latency(output_dir):
    """Run the DDS service-latency probe against the real node (needs ROS 2 sourced)."""
    out = output_dir / 'service_latency.json'
    print('[bench] service latency over DDS during a generation ...', file=sys.stderr,
          flush=True)
    completed = subprocess.run([sys.executable, str(HERE / 'service_latency.py'), '--out',
                                str(out)])
    if completed.returncode != 0:
        print('[bench] service latency probe failed (is ROS 2 sourced? run through make '
              'bench); left out', file=sys.stderr)
        return None
    return json.loads(out.read_text())


def merge_rounds(rounds):
    """
    Median of every figure over the rounds; return (results, flagged).

    ``flagged``: (peer, context, metric, values) of figures whose rounds differ by more than
    SPREAD_FLAG of their median.
    """
    merged, flagged = {}, []
    for peer in dict.fromkeys(peer for each in rounds for peer in each):
        runs = [each[peer] for each in rounds if each.get(peer)]
        if not runs:
            merged[peer] = None
            continue
        merged[peer] = {}
        for context in runs[0]:
            merged[peer][context] = {}
            for metric, value in runs[0][context].items():
                values = [run[context][metric] for run in runs
                          if isinstance(run.get(context, {}).get(metric), (int, float))]
                if not isinstance(value, (int, float)) or not values:
                    merged[peer][context][metric] = value
                    continue
                middle = statistics.median(values)
                merged[peer][context][metric] = middle
                if middle and (max(values) - min(values)) / abs(middle) > SPREAD_FLAG:
                    flagged.append((peer, context, metric, values))
    return merged, flagged


def backends_table(results, contexts):
    """Torch, onnxruntime and llama.cpp side by side: throughput and capsule verbs."""
    peers = [('engine-bfloat16', 'torch (bf16 + 4-bit decode)'),
             ('engine-float32', 'torch (fp32)'), ('engine-onnxruntime', 'onnxruntime (fp32)'),
             ('engine-tensorrt', 'tensorrt (fp32)'),
             ('llamacpp', 'llama.cpp (Q4_1)')]
    peers = [(peer, name) for peer, name in peers if results.get(peer)]

    def get(peer, context, key):
        return (results.get(peer) or {}).get(str(context), {}).get(key)

    lines = ['## Backends side by side', '',
             '| context | backend | prefill tok/s | decode tok/s | decode / llama.cpp | '
             'snapshot ms | restore into other session ms |', '|---|---|---|---|---|---|---|']
    for context in contexts:
        reference = get('llamacpp', context, 'decode_tok_s')
        for peer, name in peers:
            decode = get(peer, context, 'decode_tok_s')
            lines.append(
                f'| {context} | {name} | {cell(get(peer, context, "prefill_tok_s"), 0)} | '
                f'{cell(decode, 1)} | {ratio(decode, reference)} | '
                f'{cell(get(peer, context, "snapshot_ms"), 3)} | '
                f'{cell(get(peer, context, "restore_other_ms"), 2)} |')
    return '\n'.join(lines) + '\n'


def spread_notes(flagged, rounds):
    """Markdown list of the figures whose rounds differ by more than SPREAD_FLAG."""
    lines = ['', '## Rounds', '', f'Medians of {rounds} interleaved rounds. Figures whose rounds '
             f'differ by more than {SPREAD_FLAG:.0%} of their median:', '']
    if not flagged:
        return '\n'.join(lines + ['none.']) + '\n'
    for peer, context, metric, values in flagged:
        lines.append(f'- {peer}, context {context}, {metric}: '
                     + ', '.join(f'{value:.4g}' for value in values))
    return '\n'.join(lines) + '\n'


def ratio(numerator, denominator):
    """Format numerator / denominator as '1.23x', or a dash."""
    return f'{numerator / denominator:.2f}x' if numerator and denominator else '-'


def cell(value, digits=1):
    """Format a number or a dash."""
    return '-' if value is None else f'{value:.{digits}f}'


def tables(results, contexts):
    """Markdown tables: throughput, capsule verbs, TTFT, branches."""
    def get(peer, context, key):
        return (results.get(peer) or {}).get(str(context), {}).get(key)

    lines = ['## Prefill and decode (tokens/s, higher is better)', '',
             '| context | ' + ' | '.join(f'{peer} prefill' for peer in PEERS) + ' | '
             + ' | '.join(f'{peer} decode' for peer in PEERS) + ' |',
             '|---' * (1 + 2 * len(PEERS)) + '|']
    for context in contexts:
        lines.append(f'| {context} | ' + ' | '.join(
            cell(get(peer, context, 'prefill_tok_s'), 0) for peer in PEERS) + ' | ' + ' | '.join(
            cell(get(peer, context, 'decode_tok_s'), 1) for peer in PEERS) + ' |')
    engine = 'engine-bfloat16'
    lines += ['', '| context | engine-bfloat16 / llama.cpp prefill | engine-bfloat16 / llama.cpp '
              'decode |', '|---|---|---|']
    for context in contexts:
        ratios = [ratio(get(engine, context, key), get('llamacpp', context, key))
                  for key in ('prefill_tok_s', 'decode_tok_s')]
        lines.append(f'| {context} | {ratios[0]} | {ratios[1]} |')
    lines += ['', '## Capsule verbs (ms, lower is better)', '',
              '| context | snapshot (engine) | deepcopy cache (transformers) | save_state '
              '(llama.cpp) | rollback in place (engine) | restore into other session (engine)'
              ' | raw copy of same bytes, same conditions | restore / raw copy | raw copy '
              'back to back (warm cache) | load_state (llama.cpp) |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for context in contexts:
        restore_ms = get(engine, context, 'restore_other_ms')
        raw_copy_ms = get(engine, context, 'raw_copy_ms')
        lines.append(
            f'| {context} | {cell(get(engine, context, "snapshot_ms"), 3)} | '
            f'{cell(get("transformers", context, "snapshot_ms"))} | '
            f'{cell(get("llamacpp", context, "snapshot_ms"))} | '
            f'{cell(get(engine, context, "rollback_ms"), 3)} | '
            f'{cell(restore_ms, 2)} | {cell(raw_copy_ms, 2)} | {ratio(restore_ms, raw_copy_ms)} | '
            f'{cell(get(engine, context, "raw_copy_warm_ms"), 2)} | '
            f'{cell(get("llamacpp", context, "restore_other_ms"))} |')
    lines += ['', '## Time to first token (ms, lower is better)', '',
              '| context | cold prefill (engine) | cold prefill (llama.cpp) | cold prefill '
              '(transformers) | restore + first token (engine) | restore + one step (engine)'
              ' | load_state + one step (llama.cpp) | deepcopy + one step (transformers) | '
              'restore + 16-token observation + first token (engine) | speed-up vs cold |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for context in contexts:
        cold = get(engine, context, 'cold_ttft_ms')
        restored = get(engine, context, 'ttft_restore_ms')
        lines.append(
            f'| {context} | {cell(cold, 0)} | {cell(get("llamacpp", context, "cold_ttft_ms"), 0)}'
            f' | {cell(get("transformers", context, "cold_ttft_ms"), 0)} | {cell(restored, 2)} | '
            f'{cell(get(engine, context, "restore_step_ms"), 1)} | '
            f'{cell(get("llamacpp", context, "restore_step_ms"), 1)} | '
            f'{cell(get("transformers", context, "restore_step_ms"), 1)} | '
            f'{cell(get(engine, context, "reentry_16_ms"), 1)} | '
            f'{cell(cold / restored if cold and restored else None, 0)}x |')
    branch = (results.get(engine) or {}).get('branch')
    if branch:
        lines += ['', '## Branches', '',
                  f'{branch["branches"]} branches of a {branch["prefix_tokens"]}-token prefix, '
                  f'{branch["new_tokens"]} new tokens each, each snapshotted: branch call '
                  f'{branch["branch_ms"]:.1f} ms; all capsules stored in '
                  f'{branch["stored_bytes"] / 2 ** 20:.1f} MiB = {branch["ratio"]:.3f}x one full '
                  f'capsule ({branch["one_full_capsule_bytes"] / 2 ** 20:.1f} MiB; the floor with '
                  f'shared prefixes is '
                  f'{(branch["prefix_tokens"] + branch["branches"] * branch["new_tokens"]) / (branch["prefix_tokens"] + branch["new_tokens"]):.3f}x).']  # noqa: E501
    service = results.get('service_latency')
    if service:
        lines += ['', '## Service latency over DDS while a generation runs (ms)', '',
                  f'{service["calls"]} mixed calls from 4 client threads, '
                  f'{service["unanswered"]} unanswered, {service["wrong"]} wrong answers.', '',
                  '| service | calls | p50 | p90 | p99 | max |', '|---|---|---|---|---|---|']
        for name, stats in sorted(service['services'].items()) + [('all', service['all'])]:
            if stats.get('count'):
                lines.append(f'| {name} | {stats["count"]} | {stats["p50"]:.2f} | '
                             f'{stats["p90"]:.2f} | {stats["p99"]:.2f} | {stats["max"]:.2f} |')
    return '\n'.join(lines) + '\n'


def plot(results, contexts, path):
    """PNG: decode speed, TTFT cold vs restored, and capsule verb latencies, per context."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def series(peer, key):
        return [(results.get(peer) or {}).get(str(context), {}).get(key) for context in contexts]

    def draw(axis, lines, title, ylabel='ms'):
        for peer, key, label, style in lines:
            values = series(peer, key)
            if any(value is not None for value in values):
                axis.plot(contexts, values, style, label=label)
        axis.set(xscale='log', yscale='log', xlabel='context tokens', ylabel=ylabel, title=title)
        axis.legend(fontsize=8)

    figure, (speed, left, right) = plt.subplots(1, 3, figsize=(19, 5))
    draw(speed, [
            ('engine-bfloat16', 'decode_tok_s', 'engine bf16 + 4-bit decode weights', 'o-'),
            ('engine-bfloat16-dense', 'decode_tok_s', 'engine bf16 dense', 'o--'),
            ('engine-float32', 'decode_tok_s', 'engine fp32', 'o:'),
            ('llamacpp', 'decode_tok_s', 'llama.cpp (Q4_1)', 's-'),
            ('transformers', 'decode_tok_s', 'transformers fp32', '^-')],
         'Decode speed (higher is better)', ylabel='tokens/s')
    draw(left, [
            ('engine-bfloat16', 'cold_ttft_ms', 'engine cold prefill', 'o--'),
            ('llamacpp', 'cold_ttft_ms', 'llama.cpp cold prefill', 's--'),
            ('transformers', 'cold_ttft_ms', 'transformers cold prefill', '^--'),
            ('engine-bfloat16', 'ttft_restore_ms', 'engine restore + first token', 'o-'),
            ('engine-bfloat16', 'restore_step_ms', 'engine restore + one step', 'd-'),
            ('llamacpp', 'restore_step_ms', 'llama.cpp load_state + one step', 's-'),
            ('transformers', 'restore_step_ms', 'transformers deepcopy + one step', '^-')],
         'Time to first token: cold vs re-entry')
    draw(right, [
            ('engine-bfloat16', 'snapshot_ms', 'engine snapshot', 'o-'),
            ('engine-bfloat16', 'rollback_ms', 'engine rollback in place', 'd-'),
            ('engine-bfloat16', 'restore_other_ms', 'engine restore into other session', 'x-'),
            ('engine-bfloat16', 'raw_copy_ms', 'raw memory copy of the same bytes', 'k:'),
            ('llamacpp', 'snapshot_ms', 'llama.cpp save_state', 's-'),
            ('llamacpp', 'restore_other_ms', 'llama.cpp load_state', 's--'),
            ('transformers', 'snapshot_ms', 'transformers deepcopy', '^-')],
         'Capsule verbs')
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    """Run every peer, merge, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--contexts', type=int, nargs='+', default=[512, 2048, 8000])
    parser.add_argument('--peers', nargs='+', default=PEERS, choices=PEERS + ON_REQUEST)
    parser.add_argument('--rounds', type=int, default=2,
                        help='interleaved rounds per peer (medians; at least 2)')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--skip-service-latency', action='store_true',
                        help='leave out the DDS service-latency probe (needs ROS 2)')
    parser.add_argument('--report-only', action='store_true',
                        help='measure nothing: rewrite the tables and plot from results.json')
    arguments = parser.parse_args()
    output_dir = Path(arguments.out)
    output_dir.mkdir(parents=True, exist_ok=True)
    if arguments.report_only:
        results = json.loads((output_dir / 'results.json').read_text())
    else:
        rounds = []
        for round_index in range(arguments.rounds):
            order = arguments.peers if round_index % 2 == 0 else arguments.peers[::-1]
            rounds.append({peer: run_peer(peer, arguments.contexts, output_dir, round_index)
                           for peer in order})
        results, flagged = merge_rounds(rounds)
        results['rounds'] = {'count': arguments.rounds, 'flagged': flagged}
        if not arguments.skip_service_latency:
            results['service_latency'] = run_service_latency(output_dir)
        (output_dir / 'results.json').write_text(json.dumps(results, indent=1))
    rounds = results.get('rounds') or {'count': 1, 'flagged': []}
    text = (backends_table(results, arguments.contexts) + '\n'
            + tables(results, arguments.contexts)
            + spread_notes(rounds['flagged'], rounds['count']))
    (output_dir / 'summary.md').write_text(text)
    plot(results, arguments.contexts, output_dir / 'summary.png')
    print(text)
    print(f'written: {output_dir}/results.json, summary.md, summary.png')


if __name__ == '__main__':
    main()
