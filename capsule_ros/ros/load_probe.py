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
Load probe: several client threads fire mixed capsule service calls at a running policy node.

Used by the integration tests (every call answered, every answer sane: counts, not timings)
and by the benchmark (service latency percentiles). The caller initializes rclpy (or passes a
context) and prepares the sessions::

    report = run_load('/capsule', idle_sessions=['s1', 's2'], busy_session='s0',
                      busy_capsule='cap-1', num_threads=4, calls_per_thread=500)
    report.wrong, report.unanswered, report.percentiles()

Each thread owns one idle session (threads share sessions when there are fewer sessions than
threads; BUSY is then a sane answer too) and cycles through: ``list``; ``snapshot`` of its
session; ``restore`` of its latest capsule into its session; ``release`` of that capsule; and,
when ``busy_session`` is given (a session that is generating throughout the run), ``snapshot``
of the busy session and ``restore`` of ``busy_capsule`` into it, both of which must be BUSY.
"""

from collections import Counter
from dataclasses import dataclass
from dataclasses import field
import threading
import time

from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from capsule_ros.ros.client import NoAnswerError


@dataclass
class LoadReport:
    """Outcome of ``run_load``: answer codes, contradictions and latencies per service."""

    calls: int = 0
    unanswered: int = 0
    codes: Counter = field(default_factory=Counter)  # (service, error name) -> count
    wrong: list = field(default_factory=list)  # descriptions of answers that contradict
    latencies_ms: dict = field(default_factory=dict)  # service -> [ms, ...]
    elapsed_s: float = 0.0

    def merge(self, other):
        """Add another report's counts into this one."""
        self.calls += other.calls
        self.unanswered += other.unanswered
        self.codes.update(other.codes)
        self.wrong.extend(other.wrong)
        for service, values in other.latencies_ms.items():
            self.latencies_ms.setdefault(service, []).extend(values)

    def percentiles(self, service=None):
        """Return count, mean, p50, p90, p99 and max latency in ms (one service or all)."""
        values = sorted(
            self.latencies_ms.get(service, []) if service else
            [value for values in self.latencies_ms.values() for value in values])
        if not values:
            return {'count': 0}

        def at(fraction):
            return values[min(len(values) - 1, int(fraction * len(values)))]

        return {'count': len(values), 'mean': sum(values) / len(values), 'p50': at(0.5),
                'p90': at(0.9), 'p99': at(0.99), 'max': values[-1]}


class _Worker:
    """One client thread's state: its client, session, live capsules and tallies."""

    def __init__(self, client, session_id, exclusive):
        self.client = client
        self.session_id = session_id
        self.exclusive = exclusive  # no other thread uses this session
        self.capsules = []
        self.position = None  # the idle session's length, learned from the first snapshot
        self.report = LoadReport()

    def call(self, service, expected, **fields):
        """Call once; tally the answer; return the response or None."""
        self.report.calls += 1
        started = time.perf_counter()
        try:
            response = self.client.call(service, **fields)
        except NoAnswerError as error:
            self.report.unanswered += 1
            self.report.wrong.append(f'{service} {fields}: {error}')
            return None
        self.report.latencies_ms.setdefault(service, []).append(
            (time.perf_counter() - started) * 1e3)
        name = error_name(response.error_code)
        self.report.codes[(service, name)] += 1
        allowed = set(expected) | ({'BUSY'} if not self.exclusive else set())
        if name not in allowed or response.success != (name == 'OK'):
            self.report.wrong.append(
                f'{service} {fields}: {name} ({response.message!r}), expected one of '
                f'{sorted(allowed)}')
        return response

    def check_tokens(self, service, num_tokens):
        if self.position is None:
            self.position = num_tokens
        elif num_tokens != self.position:
            self.report.wrong.append(
                f'{service} on idle session {self.session_id}: {num_tokens} tokens, '
                f'expected {self.position}')


def _work(worker, calls, busy_session, busy_capsule):
    steps = ['list', 'snapshot', 'restore', 'release']
    if busy_session:
        steps += ['busy_snapshot', 'busy_restore']
    for index in range(calls):
        step = steps[index % len(steps)]
        if step == 'list':
            worker.call('list', ['OK'])
        elif step == 'snapshot':
            response = worker.call('snapshot', ['OK'], session_id=worker.session_id)
            if response is not None and response.success:
                worker.capsules.append(response.capsule.capsule_id)
                worker.check_tokens('snapshot', response.capsule.num_tokens)
        elif step == 'restore':
            if worker.capsules:
                response = worker.call('restore', ['OK'], capsule_id=worker.capsules[-1],
                                       session_id=worker.session_id)
                if response is not None and response.success:
                    worker.check_tokens('restore', response.num_tokens)
            else:
                worker.call('restore', ['UNKNOWN_CAPSULE'], capsule_id='no-such-capsule')
        elif step == 'release':
            if worker.capsules:
                worker.call('release', ['OK'], capsule_id=worker.capsules.pop())
            else:
                worker.call('release', ['UNKNOWN_CAPSULE'], capsule_id='no-such-capsule')
        elif step == 'busy_snapshot':
            response = worker.call('snapshot', ['BUSY'], session_id=busy_session)
            if response is not None and response.success:  # wrong, but do not leak it
                worker.capsules.append(response.capsule.capsule_id)
        elif step == 'busy_restore':
            worker.call('restore', ['BUSY'], capsule_id=busy_capsule, session_id=busy_session)
    for capsule_id in worker.capsules:  # leave the store as it was
        worker.call('release', ['OK', 'UNKNOWN_CAPSULE'], capsule_id=capsule_id)


def run_load(node_name='/capsule', idle_sessions=(), busy_session='', busy_capsule='',
             num_threads=4, calls_per_thread=500, context=None, timeout_s=10.0):
    """
    Fire ``num_threads * calls_per_thread`` mixed calls from parallel clients; return a report.

    ``idle_sessions`` must be open and not used by anything else during the run; their
    capsules are created and released again. ``busy_session`` (optional) must generate for
    the whole run, and ``busy_capsule`` be a capsule whose restore target is that session.
    """
    if not idle_sessions:
        raise ValueError('run_load needs at least one idle session')
    users = Counter(idle_sessions[index % len(idle_sessions)] for index in range(num_threads))
    workers = []
    for index in range(num_threads):
        session_id = idle_sessions[index % len(idle_sessions)]
        client = CapsuleClient(node_name, timeout_s, context=context,
                               client_name=f'load_probe_{index}')
        workers.append(_Worker(client, session_id, users[session_id] == 1))
    threads = [threading.Thread(target=_work, args=(worker, calls_per_thread, busy_session,
                                                    busy_capsule), daemon=True)
               for worker in workers]
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for worker in workers:
            worker.client.close()
    report = LoadReport()
    for worker in workers:
        report.merge(worker.report)
    report.elapsed_s = time.perf_counter() - started
    return report
