#!/usr/bin/env python3
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
Planner demo: a task briefing, three branches with different observations, a rollback.

Runs against a running policy node (``make demo`` starts one) through the real services and
the Generate action:

1. a ~1.5k-token robot task briefing is appended to a session (a cold prefill) and
   snapshotted as ``task-briefing`` (pinned);
2. the capsule is branched into three sessions; each gets a different observation and
   generates a plan (snapshotted as ``plan-N``);
3. the briefing session takes a side question, is restored to ``task-briefing`` and continues
   with a fourth observation;
4. for every step the same full context is generated in a fresh session from scratch (cold
   prefill), and the table compares time to first token: cold vs from the capsule.

Times are the node's own measurements (service ``latency_ms``, goal ``ttft_ms``), so DDS
transport is not counted on either side.
"""

import sys

from capsule_ros.action import Generate
from capsule_ros.ros.cli import capsule_to_dict
from capsule_ros.ros.cli import lineage_tree
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from capsule_ros.ros.client import NoAnswerError
import rclpy

MAX_NEW_TOKENS = 24
STARTUP_TIMEOUT_S = 300.0  # the first ever start converts the GGUF (~45 s)

OBSERVATIONS = [
    'Camera: aisle 3 is blocked by a fallen pallet. The toolbox is visible on shelf C4.',
    'Lidar: a person is standing next to shelf C4 and talking on the phone.',
    'Battery: 18 percent. The charging dock is free.',
    'Operator: new priority. First bring the first-aid kit from shelf A1 to the door.',
]
SIDE_QUESTION = 'Side question from the operator: which tools are usually in the toolbox?'


def briefing_text():
    """Return the robot task briefing (about 1.5k tokens of SmolLM2's tokenizer)."""
    parts = [
        'TASK BRIEFING FOR MOBILE ROBOT UNIT 7 (warehouse B, night shift).',
        'You are the planner of a wheeled mobile manipulator with a two-finger gripper, a '
        'lidar, a front camera and a 40 kg payload limit. You receive observations and '
        'answer with short numbered plans: one action per line, verbs from the action list.',
        'ACTION LIST: move_to(place), pick(object), place(object, place), open(door), '
        'wait(seconds), ask_operator(question), dock(), report(text).',
        'SITE MAP. The warehouse is a rectangle of 60 by 40 meters. The main door is in the '
        'middle of the west wall. The charging dock is in the south-east corner. The '
        'workbench is two meters north of the main door.',
    ]
    contents = ['spare wheels', 'cable reels', 'paint cans', 'boxes of screws',
                'safety helmets', 'hand tools', 'drill batteries', 'packing foam']
    for aisle, letter in enumerate('ABCDEFGH', start=1):
        shelves = '; '.join(
            f'{letter}{index} holds {contents[(aisle + index) % len(contents)]}'
            for index in range(1, 9))
        parts.append(f'Aisle {aisle} runs north to south along shelf row {letter}. '
                     f'{shelves}. The floor of aisle {aisle} is marked with '
                     f'{["yellow", "blue", "green"][aisle % 3]} tape.')
    log = ['forklift 2 parked in aisle 5', 'door sensor at the west wall replaced',
           'shelf D3 reorganised', 'spill cleaned in aisle 1', 'lights in aisle 7 dimmed',
           'pallet of paint cans delivered to row G', 'robot unit 4 sent for repair',
           'charging dock firmware updated', 'inventory count of row B finished',
           'new helmets stored on shelf E2']
    parts.append('RECENT LOG. ' + ' '.join(
        f'At {18 + index // 2}:{(index % 2) * 30:02d}, {entry}.'
        for index, entry in enumerate(log)))
    people = [('Maria', 'shift lead', 'main door'), ('Tom', 'forklift driver', 'row G'),
              ('Aiko', 'inventory clerk', 'row B'), ('Sam', 'technician', 'workbench')]
    parts.append('PEOPLE ON SHIFT. ' + ' '.join(
        f'{name} is the {role} and usually works near the {place}; address {name} by name '
        f'and keep one meter of distance when passing.' for name, role, place in people))
    parts.append('ZONES. The loading zone covers the first five meters inside the main door; '
                 'drive at walking speed there. Rows G and H hold heavy goods: never pick from '
                 'their top shelves. The area around the charging dock must stay free of '
                 'pallets. Aisle 8 is reserved for forklifts between 22:00 and 23:00.')
    parts += [
        'SPECIAL ITEMS. The red toolbox is on shelf C4. The first-aid kit is on shelf A1. '
        'The spare gripper fingers are in the drawer of the workbench.',
        'SAFETY RULES. 1. Keep at least one meter from people; if someone is closer, wait '
        'and ask them to step aside. 2. Never drive through a blocked aisle; take the next '
        'free aisle and report the obstacle. 3. Below 20 percent battery, finish the current '
        'pick and go to the dock before anything else. 4. Do not lift more than 40 kg. '
        '5. The main door must stay closed at night except while passing. 6. Report every '
        'anomaly with report(text).',
        'CURRENT TASK. Bring the red toolbox from shelf C4 to the workbench. The robot is '
        'at the charging dock with 65 percent battery. Aisles 2 and 4 are the usual routes '
        'to row C. The operator is at the main door and can answer questions.',
        'ANSWER FORMAT. Reply with a numbered plan of at most six steps. No explanations.',
    ]
    return '\n\n'.join(parts)


def check(response, what):
    """Exit with the node's message when a call failed; return the response."""
    if not response.success:
        sys.exit(f'planner_demo: {what} failed: {error_name(response.error_code)}: '
                 f'{response.message}')
    return response


def wait_until_active(client):
    """Wait until the node answers (model load may take a while); exit if it never does."""
    try:
        client.wait_until_active(STARTUP_TIMEOUT_S)
    except NoAnswerError:
        sys.exit(f'planner_demo: the node did not come up within {STARTUP_TIMEOUT_S} s')


def plan(client, session_id, observation, label=''):
    """Generate a plan for ``observation`` in ``session_id``; return the result."""
    status, result = client.generate(
        session_id=session_id, prompt=observation, role=Generate.Goal.ROLE_OBSERVATION,
        max_new_tokens=MAX_NEW_TOKENS, snapshot_after=bool(label), label=label)
    if result is None:
        sys.exit('planner_demo: generate goal rejected')
    return check(result, f'generate in {session_id}')


def cold_run(client, briefing, observation):
    """Prefill the same full context in a fresh session; return (ttft_ms, result)."""
    appended = check(client.append(briefing), 'cold append')
    result = plan(client, appended.session_id, observation)
    check(client.close_session(appended.session_id), 'close')
    return appended.latency_ms + result.ttft_ms, result


def one_line(text):
    """Return the first 70 characters of ``text`` on one line."""
    flat = ' '.join(text.split())
    return flat if len(flat) <= 70 else flat[:67] + '...'


def main():
    """Run the scenario; print the capsule tree and the TTFT table."""
    rclpy.init()
    client = CapsuleClient(timeout_s=60.0, client_name='planner_demo')
    try:
        wait_until_active(client)
        briefing = briefing_text()
        print('[demo] 1. task briefing -> session, snapshot task-briefing (pinned)')
        appended = check(client.append(briefing), 'append briefing')
        home = appended.session_id
        print(f'       {appended.position} tokens in session {home}; cold prefill '
              f'{appended.latency_ms:.0f} ms')
        briefing_capsule = check(client.snapshot(home, label='task-briefing', pin=True),
                                 'snapshot').capsule
        print(f'       snapshot {briefing_capsule.capsule_id}: {briefing_capsule.num_tokens} '
              f'tokens, {(briefing_capsule.kv_bytes + briefing_capsule.state_bytes) / 2**20:.1f}'
              f' MiB of state, no KV copied')

        print('[demo] 2. branch task-briefing x3, one observation each')
        branched = check(client.branch('task-briefing', 3), 'branch')
        print(f'       sessions {" ".join(branched.session_ids)} in '
              f'{branched.latency_ms:.1f} ms')
        steps = []  # (name, restored overhead ms, result)
        for index, (session_id, observation) in enumerate(
                zip(branched.session_ids, OBSERVATIONS), start=1):
            result = plan(client, session_id, observation, label=f'plan-{index}')
            steps.append((f'branch {index}', observation, branched.latency_ms, result))
            print(f'       plan-{index} ({session_id}): {one_line(result.text)}')
        for session_id in branched.session_ids:
            check(client.close_session(session_id), 'close')

        print('[demo] 3. side question in the briefing session, then restore task-briefing')
        side = plan(client, home, SIDE_QUESTION)
        print(f'       side answer: {one_line(side.text)}')
        restored = check(client.restore('task-briefing', session_id=home), 'restore')
        print(f'       restored {restored.num_tokens} tokens into {restored.session_id} in '
              f'{restored.latency_ms:.1f} ms ({restored.copied_bytes} bytes copied)')
        result = plan(client, home, OBSERVATIONS[3], label='plan-4')
        steps.append(('restore + continue', OBSERVATIONS[3], restored.latency_ms, result))
        print(f'       plan-4: {one_line(result.text)}')
        saved = check(client.save('task-briefing'), 'save')
        print(f'       saved task-briefing for the next boot: {saved.path} '
              f'({saved.bytes_written / 2**20:.1f} MiB, {saved.latency_ms:.0f} ms)')

        print('[demo] 4. the same contexts from scratch (cold prefill) for comparison')
        rows = []
        for name, observation, overhead_ms, result in steps:
            cold_ms, cold = cold_run(client, briefing, observation)
            warm_ms = overhead_ms + result.ttft_ms
            same = list(cold.token_ids) == list(result.token_ids)
            rows.append((name, cold_ms, warm_ms, same))

        listed = check(client.list_capsules(), 'list')
        print('\ncapsule tree:')
        for line in lineage_tree([capsule_to_dict(info) for info in listed.capsules]):
            print('  ' + line)
        print(f'  ({listed.used_bytes / 2**20:.1f} of {listed.budget_bytes / 2**20:.0f} MiB '
              f'of capsule budget used)')

        print('\ntime to first token of each plan (node-side ms; restored = restore/branch '
              'call + observation prefill + first token):')
        header = (f'  {"step":<20} {"cold prefill":>13} {"from capsule":>13} '
                  f'{"speed-up":>9}  identical plan')
        print(header)
        print('  ' + '-' * (len(header) - 2))
        for name, cold_ms, warm_ms, same in rows:
            print(f'  {name:<20} {cold_ms:>10.0f} ms {warm_ms:>10.0f} ms '
                  f'{cold_ms / warm_ms:>8.1f}x  {"yes" if same else "NO"}')
        total_cold = sum(row[1] for row in rows)
        total_warm = sum(row[2] for row in rows)
        print(f'  {"total":<20} {total_cold:>10.0f} ms {total_warm:>10.0f} ms '
              f'{total_cold / total_warm:>8.1f}x')
        if not all(row[3] for row in rows):
            print('planner_demo: a restored plan differs from its cold run', file=sys.stderr)
            return 1
        return 0
    finally:
        client.close()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
