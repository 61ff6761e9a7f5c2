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
Capsules survive a node restart, and only a node of the same model accepts them.

Node A (bfloat16) saves a capsule and records the greedy continuation after it; node B
(float32: a different model fingerprint) refuses the file; node C (bfloat16 again, a fresh
process) loads it and continues with exactly the tokens A produced.
"""

from action_msgs.msg import GoalStatus
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok

TIMEOUT_S = 30.0
PROMPT = ('The robot stands at the dock with 80 % battery. Plan the route to shelf C, '
          'avoiding aisle 3.')


def run_node(tmp_path, name, context, dtype, work):
    """Start a node, run ``work(client)`` against it, stop it; return what work returned."""
    process = NodeProcess(tmp_path / f'{name}.log',
                          *light_parameters(tmp_path / 'capsules', dtype=dtype))
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name=name)
    try:
        process.wait_until_active(client)
        return work(client)
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()


def generate(client, session_id, max_new_tokens):
    """Continue ``session_id`` greedily; return the token ids."""
    status, result = client.generate(session_id=session_id, max_new_tokens=max_new_tokens)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    return list(ok(result).token_ids)


def test_saved_capsule_continues_identically_after_restart(tmp_path, context):
    """Save, stop, start another node, load, generate: the same tokens as before the stop."""
    def before_restart(client):
        session_id = ok(client.append(PROMPT)).session_id
        first = generate(client, session_id, 3)
        capsule = ok(client.snapshot(session_id, label='mid-plan')).capsule
        saved = ok(client.save('mid-plan'))
        assert saved.path == str(tmp_path / 'capsules' / 'mid-plan')
        return first, capsule, generate(client, session_id, 6)

    first, capsule, continuation = run_node(tmp_path, 'node_a', context, 'bfloat16',
                                            before_restart)
    assert len(first) == 3 and len(continuation) == 6

    def other_model(client):
        refused = client.load('mid-plan')
        assert not refused.success
        assert error_name(refused.error_code) == 'FINGERPRINT_MISMATCH', refused.message
        assert 'fingerprint' in refused.message
        assert ok(client.list_capsules()).capsules == []

    run_node(tmp_path, 'node_b_float32', context, 'float32', other_model)

    def after_restart(client):
        loaded = ok(client.load('mid-plan')).capsule
        assert loaded.capsule_id == 'mid-plan'
        assert loaded.num_tokens == capsule.num_tokens
        assert loaded.model_fingerprint == capsule.model_fingerprint
        assert loaded.parent_id == capsule.parent_id
        restored = ok(client.restore('mid-plan'))  # its session is gone: a new one
        assert restored.num_tokens == capsule.num_tokens
        return generate(client, restored.session_id, 6)

    assert run_node(tmp_path, 'node_c', context, 'bfloat16', after_restart) == continuation
