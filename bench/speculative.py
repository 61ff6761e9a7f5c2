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
Speculative decoding with prompt lookup on the default model (SmolLM2-135M-Instruct).

Two workloads, greedy, the node's default engine settings (bf16, 4-bit decode weights):

- planner: a world description (docks, aisles, shelves, objects) as the system turn, one
  worked example and a task; the plan is tool calls that quote the world's names (what robot
  planners do);
- chat: a short open question, whose answer seldom repeats its context (the overhead case).

Per workload it runs plain decoding and lookup with k = 2, 3, 4, 8 drafts per pass in
interleaved rounds (every variant once per round; medians), and reports decode tok/s, the
speed-up, acceptance (accepted / drafted), tokens per forward pass, and whether the tokens equal
plain greedy decoding's (else the first divergent step).

MTP drafting has no trained head for SmolLM2, so a random one (``write_random_mtp_head``) shows
the mechanism's cost on the planner workload: keeping the head's state in step (one more
decoder layer per forward pass, prefill included) and drafting with it (k head steps and a
verify pass of k + 1 rows per round, nearly every draft rejected), against an engine without
MTP state, in the same interleaved rounds. Run from the repository root::

    PYTHONPATH=. python bench/speculative.py [--rounds 5] [--tokens 160] [--out bench/results]

Writes ``speculative.json``, ``speculative.md`` and ``speculative.png``; progress on stderr.
"""

import argparse
import json
from pathlib import Path
import statistics
import sys
import tempfile
import time

import torch

HERE = Path(__file__).resolve().parent
THREADS = 2
DRAFTS = [2, 3, 4, 8]
WORLD = """You are the task planner of a warehouse robot. The world:
- dock_A (charging dock, south-east corner); dock_B (loading dock, north-west corner).
- aisle_1 connects dock_A, shelf_north_1 and shelf_north_2.
- aisle_2 connects shelf_north_2, shelf_center_3 and workbench_east.
- aisle_3 connects workbench_east, shelf_south_4 and dock_B; aisle_3 is closed for cleaning.
- shelf_north_1 holds red_toolbox_17 and blue_crate_04.
- shelf_north_2 holds green_bin_22 and yellow_case_09.
- shelf_center_3 holds torque_wrench_31 and spare_wheel_12.
- shelf_south_4 holds cable_spool_40 and battery_pack_08.
Tools: navigate(location), pick(object, location), place(object, location), report(text).
Answer with the plan only: one tool call per line, with the exact names from the world."""
EXAMPLE_TASK = 'Task: bring green_bin_22 and yellow_case_09 to dock_A.'
EXAMPLE_PLAN = """navigate(aisle_1)
navigate(shelf_north_2)
pick(green_bin_22, shelf_north_2)
pick(yellow_case_09, shelf_north_2)
navigate(aisle_1)
navigate(dock_A)
place(green_bin_22, dock_A)
place(yellow_case_09, dock_A)
report(green_bin_22 and yellow_case_09 are at dock_A)"""
PLANNER_REQUEST = ('Task: bring red_toolbox_17 and torque_wrench_31 to workbench_east, then '
                   'bring blue_crate_04 from shelf_north_1 to dock_B.')
CHAT_REQUEST = 'Why do robots need maps? Answer in a few sentences.'


def log(line):
    """Progress on stderr."""
    print(f'[speculative] {line}', file=sys.stderr, flush=True)


def make_engine(scratch, model_path='', **generation):
    """Load the default model (or ``model_path``) with the node's default engine settings."""
    from capsule_ros.runtime.config import PolicyConfig
    from capsule_ros.runtime.engine import PolicyEngine
    return PolicyEngine(PolicyConfig.from_dict({
        'model': {'path': str(model_path)}, 'generation': generation,
        'engine': {'max_seq_len': 4096, 'max_sessions': 2},
        'capsules': {'dir': str(Path(scratch) / 'capsules')}}),
        progress=lambda message: log(message))


def with_random_mtp_head(scratch):
    """Link the default model's files into a scratch directory and add a random MTP head."""
    from capsule_ros.runtime import loader
    from capsule_ros.runtime.testing import write_random_mtp_head
    source = loader.resolve_model('', progress=lambda message: log(message)).directory
    target = Path(scratch) / 'smollm2-random-mtp'
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).symlink_to(item)
    log('writing a random MTP head for the default model')
    return write_random_mtp_head(target, seed=0)


def planner_turns():
    """Return the planner's context: the world as system turn, one worked example, the task."""
    from capsule_ros.runtime.chat import Role
    return [(Role.SYSTEM, WORLD), (Role.USER, EXAMPLE_TASK),
            (Role.RAW, f'<|im_start|>assistant\n{EXAMPLE_PLAN}<|im_end|>\n'),
            (Role.USER, PLANNER_REQUEST)]


def one_run(engine, turns, tokens, mode, drafts):
    """Generate ``tokens`` greedily after ``turns``; return the tokens and the decode rate."""
    session = engine.create_session(system_prompt=False)
    try:
        started = time.perf_counter()
        prompt_tokens = sum(engine.append(session, text, role=role) for role, text in turns)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        result = engine.generate(session, tokens, speculative=mode, num_draft_tokens=drafts)
        elapsed = time.perf_counter() - started
        return {'tokens': list(result.token_ids), 'seconds': elapsed,
                'prefill_tok_s': prompt_tokens / prefill_s,
                'tok_s': len(result.token_ids) / elapsed, 'drafted': result.drafted_tokens,
                'accepted': result.accepted_tokens}
    finally:
        engine.close_session(session)


def first_divergence(tokens, reference):
    """Index of the first differing token, or None when equal."""
    for index, (got, want) in enumerate(zip(tokens, reference)):
        if got != want:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def measure(engine, rounds, tokens):
    """Interleaved rounds over every workload and variant; return per-variant summaries."""
    from capsule_ros.runtime.chat import Role
    workloads = {'planner': planner_turns(), 'chat': [(Role.USER, CHAT_REQUEST)]}
    variants = [('off', 0)] + [('lookup', drafts) for drafts in DRAFTS]
    samples = {(workload, variant): [] for workload in workloads for variant in variants}
    for round_index in range(rounds):
        for workload, prompt in workloads.items():
            order = variants if round_index % 2 == 0 else list(reversed(variants))
            for mode, drafts in order:
                log(f'round {round_index + 1}/{rounds}: {workload}, {mode} k={drafts}')
                samples[(workload, (mode, drafts))].append(
                    one_run(engine, prompt, tokens, mode, drafts or 1))
    results = []
    for workload in workloads:
        plain = samples[(workload, ('off', 0))]
        plain_rate = statistics.median(run['tok_s'] for run in plain)
        for mode, drafts in variants:
            runs = samples[(workload, (mode, drafts))]
            rate = statistics.median(run['tok_s'] for run in runs)
            drafted = sum(run['drafted'] for run in runs)
            accepted = sum(run['accepted'] for run in runs)
            generated = sum(len(run['tokens']) for run in runs)
            divergence = first_divergence(runs[0]['tokens'], plain[0]['tokens'])
            results.append({
                'workload': workload, 'mode': mode, 'drafts': drafts, 'tok_s': rate,
                'speedup': rate / plain_rate, 'drafted': drafted, 'accepted': accepted,
                'acceptance': accepted / drafted if drafted else None,
                # forward passes = generated tokens - accepted drafts
                'tokens_per_pass': generated / (generated - accepted),
                'identical': divergence is None, 'first_divergence': divergence,
                'rounds': len(runs), 'tok_s_all': [run['tok_s'] for run in runs]})
    return results


MTP_VARIANTS = [('no MTP state', 'plain', 'off', 1),
                ('MTP state kept, no drafts', 'mtp', 'off', 1),
                ('MTP k=1', 'mtp', 'mtp', 1), ('MTP k=3', 'mtp', 'mtp', 3)]


def measure_mtp(engines, rounds, tokens):
    """Measure the random MTP head's cost on the planner workload against an engine without."""
    turns = planner_turns()
    samples = {variant: [] for variant in MTP_VARIANTS}
    for round_index in range(rounds):
        order = MTP_VARIANTS if round_index % 2 == 0 else list(reversed(MTP_VARIANTS))
        for variant in order:
            name, engine, mode, drafts = variant
            log(f'round {round_index + 1}/{rounds}: planner, {name}')
            samples[variant].append(one_run(engines[engine], turns, tokens, mode, drafts))
    plain = samples[MTP_VARIANTS[0]]
    plain_rate = statistics.median(run['tok_s'] for run in plain)
    plain_prefill = statistics.median(run['prefill_tok_s'] for run in plain)
    results = []
    for variant in MTP_VARIANTS:
        runs = samples[variant]
        rate = statistics.median(run['tok_s'] for run in runs)
        prefill = statistics.median(run['prefill_tok_s'] for run in runs)
        drafted = sum(run['drafted'] for run in runs)
        accepted = sum(run['accepted'] for run in runs)
        divergence = first_divergence(runs[0]['tokens'], plain[0]['tokens'])
        results.append({
            'variant': variant[0], 'tok_s': rate, 'relative': rate / plain_rate,
            'prefill_tok_s': prefill, 'prefill_relative': prefill / plain_prefill,
            'drafted': drafted, 'accepted': accepted, 'identical': divergence is None,
            'first_divergence': divergence, 'tok_s_all': [run['tok_s'] for run in runs]})
    return results


def report_mtp(results, rounds, tokens):
    """Markdown table of the MTP mechanism's cost."""
    lines = ['', "## MTP drafting with a random head (the mechanism's cost)", '',
             f'Planner workload, greedy, {tokens} new tokens; medians of {rounds} interleaved '
             f'rounds. A random head drafts nothing useful: this is the cost of keeping its '
             f'state (one more decoder layer per forward pass) and of drafting with it.', '',
             '| variant | decode tok/s | vs no MTP state | prefill tok/s | vs no MTP state | '
             'accepted / drafted | tokens = plain greedy |', '|---|---|---|---|---|---|---|']
    for row in results:
        acceptance = f"{row['accepted']} / {row['drafted']}" if row['drafted'] else '-'
        identical = ('yes' if row['identical']
                     else f"no (first difference at token {row['first_divergence']})")
        lines.append(f"| {row['variant']} | {row['tok_s']:.1f} | {row['relative']:.2f}x | "
                     f"{row['prefill_tok_s']:.0f} | {row['prefill_relative']:.2f}x | "
                     f'{acceptance} | {identical} |')
    return '\n'.join(lines) + '\n'


def report(results, rounds, tokens, model):
    """Markdown table."""
    lines = [f'# Speculative decoding (prompt lookup) on {model}', '',
             f'Greedy, {tokens} new tokens, bf16 with 4-bit decode weights, {THREADS} threads; '
             f'medians of {rounds} interleaved rounds.', '',
             '| workload | drafts | decode tok/s | speed-up | accepted / drafted | tokens per '
             'forward pass | tokens = plain greedy |', '|---|---|---|---|---|---|---|']
    for row in results:
        drafts = 'off' if row['mode'] == 'off' else f"lookup k={row['drafts']}"
        acceptance = (f"{row['accepted']} / {row['drafted']} ({row['acceptance']:.0%})"
                      if row['drafted'] else '-')
        identical = ('yes' if row['identical']
                     else f"no (first difference at token {row['first_divergence']})")
        lines.append(f"| {row['workload']} | {drafts} | {row['tok_s']:.1f} | "
                     f"{row['speedup']:.2f}x | {acceptance} | {row['tokens_per_pass']:.2f} | "
                     f'{identical} |')
    return '\n'.join(lines) + '\n'


def plot(results, path):
    """Bar chart of decode tok/s per workload and variant."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    workloads = sorted({row['workload'] for row in results}, reverse=True)
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6))
    for axis, workload in zip(axes, workloads):
        rows = [row for row in results if row['workload'] == workload]
        labels = ['off' if row['mode'] == 'off' else f"k={row['drafts']}" for row in rows]
        bars = axis.bar(labels, [row['tok_s'] for row in rows],
                        color=['grey'] + ['tab:blue'] * (len(rows) - 1))
        for bar, row in zip(bars, rows):
            axis.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                                     bar.get_height()),
                          ha='center', va='bottom', fontsize=8)
        axis.set_title(f'{workload}: decode tok/s, prompt lookup')
        axis.set_ylabel('tokens / s')
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    """Run, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--tokens', type=int, default=160)
    parser.add_argument('--out', default=str(HERE / 'results'))
    arguments = parser.parse_args()
    torch.set_num_threads(THREADS)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(scratch)
        one_run(engine, planner_turns(), 8, 'lookup', 4)  # first-call allocations
        results = measure(engine, arguments.rounds, arguments.tokens)
        model = Path(engine.model_name).name
        mtp_engine = make_engine(scratch, with_random_mtp_head(scratch), speculative='mtp')
        one_run(mtp_engine, planner_turns(), 8, 'mtp', 3)
        mtp_results = measure_mtp({'plain': engine, 'mtp': mtp_engine}, arguments.rounds,
                                  arguments.tokens)
    text = (report(results, arguments.rounds, arguments.tokens, model)
            + report_mtp(mtp_results, arguments.rounds, arguments.tokens))
    print(text)
    (out / 'speculative.md').write_text(text)
    (out / 'speculative.json').write_text(json.dumps({'lookup': results, 'mtp': mtp_results},
                                                     indent=1))
    plot(results, out / 'speculative.png')
    log(f'wrote {out}/speculative.md, .json, .png')


if __name__ == '__main__':
    main()
