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
Virtual sessions over real DDS: a node with 4 slots holds 20 open sessions.

Idle sessions are swapped out to the capsule pool when a slot is needed and swapped back in on
their next use; each continues exactly as an uninterrupted run, whatever the order.
"""

import random

from action_msgs.msg import GoalStatus
from capsule_ros.ros.client import CapsuleClient
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok
import pytest
import rclpy

TIMEOUT_S = 30.0
SLOTS = 4


@pytest.fixture(scope='module')
def client(tmp_path_factory):
    """Start a node with 4 slots; yield a connected client; stop the node."""
    tmp_path = tmp_path_factory.mktemp('virtual')
    context = rclpy.context.Context()
    rclpy.init(context=context)
    process = NodeProcess(tmp_path / 'node.log',
                          *light_parameters(tmp_path / 'capsules', max_sessions=SLOTS))
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='virtual')
    try:
        process.wait_until_active(client)
        yield client
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()
        rclpy.try_shutdown(context=context)


def generate(client, session_id='', prompt='', max_new_tokens=3):
    """Run one goal; return its result."""
    status, result = client.generate(session_id=session_id, prompt=prompt,
                                     max_new_tokens=max_new_tokens)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    return ok(result)


def test_twenty_sessions_on_four_slots_continue_exactly(client):
    prompts = [f'Robot {index}: carry box {index} to dock {index % 3}.' for index in range(20)]
    sessions = [ok(client.append(prompt)).session_id for prompt in prompts]
    assert len(set(sessions)) == 20
    order = list(range(20)) * 2
    random.Random(7).shuffle(order)
    visits = {index: [] for index in range(20)}
    for index in order:
        visits[index].append(list(generate(client, sessions[index]).token_ids))
    listed = ok(client.list_capsules())
    assert set(sessions) <= set(listed.sessions)
    assert listed.capsules == []  # swapped-out sessions are not capsules of the user
    for index in random.Random(8).sample(range(20), 6):  # uninterrupted reference runs
        reference = ok(client.append(prompts[index])).session_id
        for tokens in visits[index]:
            assert list(generate(client, reference).token_ids) == tokens, index
        ok(client.close_session(reference))
    for session in sessions:
        ok(client.close_session(session))


def test_goals_without_a_session_never_run_out_of_slots(client):
    """Each goal with an empty session_id opens a session; more goals than slots all succeed."""
    results = [generate(client, prompt=f'Say hello to visitor {index}.')
               for index in range(SLOTS + 3)]
    opened = [result.session_id for result in results]
    assert len(set(opened)) == SLOTS + 3
    assert set(opened) <= set(ok(client.list_capsules()).sessions)  # open until closed
    first = generate(client, opened[0])  # the oldest was swapped out; it continues
    assert first.session_id == opened[0]
    for session in opened:
        ok(client.close_session(session))
