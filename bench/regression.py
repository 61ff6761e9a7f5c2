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
Before / after: this tree's engine against an earlier commit's, on the default model.

``python bench/regression.py --before <commit> [--peer engine-bfloat16] [--rounds 3]`` checks the
commit out into a temporary git worktree and runs this tree's ``bench/peers.py <peer>`` on each
tree's runtime (one measurement method for both) in alternating rounds (before, after, before,
after, ...), so that the machine's drift hits both alike; it prints the medians side by side
and writes ``bench/results/regression.md``.
"""

import argparse
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METRICS = [('prefill_tok_s', 'prefill tok/s', 0), ('decode_tok_s', 'decode tok/s', 1),
           ('snapshot_ms', 'snapshot ms', 3), ('rollback_ms', 'rollback in place ms', 3),
           ('restore_other_ms', 'restore into other session ms', 2),
           ('ttft_restore_ms', 'restore + first token ms', 2),
           ('cold_ttft_ms', 'cold TTFT ms', 0)]


def run_tree(tree, peer, contexts, out):
    """Run this tree's ``bench/peers.py`` on the runtime of ``tree``; return its results."""
    # one measurement method for both: this tree's peers.py, the runtime from PYTHONPATH
    command = [sys.executable, str(HERE / 'peers.py'), peer, '--out', str(out),
               '--contexts', *map(str, contexts)]
    environment = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS='2')
    subprocess.run(command, env=environment, check=True, cwd=tree)
    return json.loads(Path(out).read_text())


def main():
    """Alternate the two trees, take medians, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--before', required=True, help='commit to compare against')
    parser.add_argument('--peer', default='engine-bfloat16')
    parser.add_argument('--contexts', type=int, nargs='+', default=[512, 2048])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--out', default=str(HERE / 'results' / 'regression.md'))
    arguments = parser.parse_args()
    samples = {'before': [], 'after': []}
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / 'before'
        subprocess.run(['git', '-C', str(ROOT), 'worktree', 'add', '--detach', str(worktree),
                        arguments.before], check=True, capture_output=True)
        try:
            for round_index in range(arguments.rounds):
                for name, tree in (('before', worktree), ('after', ROOT)):
                    print(f'[regression] round {round_index + 1}/{arguments.rounds}: {name}',
                          file=sys.stderr, flush=True)
                    samples[name].append(run_tree(tree, arguments.peer, arguments.contexts,
                                                  Path(scratch) / f'{name}.json'))
        finally:
            subprocess.run(['git', '-C', str(ROOT), 'worktree', 'remove', '--force',
                            str(worktree)], capture_output=True)
    lines = [f'# {arguments.peer}: {arguments.before[:12]} (before) vs this tree (after)', '',
             f'Medians of {arguments.rounds} alternating rounds.', '',
             '| metric | context | before | after | after / before |', '|---|---|---|---|---|']
    for key, label, digits in METRICS:
        for context in arguments.contexts:
            values = {name: [run[str(context)][key] for run in runs
                             if run.get(str(context), {}).get(key) is not None]
                      for name, runs in samples.items()}
            if not values['before'] or not values['after']:
                continue
            before = statistics.median(values['before'])
            after = statistics.median(values['after'])
            lines.append(f'| {label} | {context} | {before:.{digits}f} | {after:.{digits}f} | '
                         f'{after / before:.2f}x |')
    text = '\n'.join(lines) + '\n'
    Path(arguments.out).write_text(text)
    print(text)


if __name__ == '__main__':
    main()
