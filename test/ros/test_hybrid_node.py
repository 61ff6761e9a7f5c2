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
The node on hybrid checkpoints (LFM2, Qwen3.5), pointed at them with ``model.path``.

Every capsule service over real DDS: snapshot, rollback, restore into another session, branch,
save, a node restart and load; each continuation must equal the uninterrupted one token for
token. The checkpoints are small random-weight Hugging Face directories written by
transformers, loaded exactly as a user's download.
"""

from action_msgs.msg import GoalStatus
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.runtime.testing import write_tiny_model
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok
import pytest

TIMEOUT_S = 30.0
PROMPT = 'The robot stands at the dock. Plan the route to shelf C, avoiding aisle 3.'


def generate(client, session_id, max_new_tokens=6):
    """Continue ``session_id`` greedily; return the token ids."""
    status, result = client.generate(session_id=session_id, max_new_tokens=max_new_tokens)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    return list(ok(result).token_ids)


def run_node(tmp_path, name, context, model_dir, work):
    """Start a node on ``model_dir``, run ``work(client)``, stop it; return what work returned."""
    process = NodeProcess(tmp_path / f'{name}.log',
                          *light_parameters(tmp_path / 'capsules', dtype='float32'),
                          '-p', f'model.path:={model_dir}')
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name=name)
    try:
        process.wait_until_active(client)
        return work(client)
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()


@pytest.mark.parametrize('family', ['lfm2', 'qwen3_5_text'])
def test_hybrid_node_capsule_services_continue_exactly(tmp_path, context, family):
    model_dir = write_tiny_model(tmp_path / family, family=family)

    def first_node(client):
        session_id = ok(client.append(PROMPT)).session_id
        generate(client, session_id, 3)
        capsule = ok(client.snapshot(session_id, label='mid-plan')).capsule
        assert capsule.conv_bytes > 0  # the short-convolution tails are in the capsule
        if family.startswith('qwen3_5'):
            assert capsule.recurrent_bytes > 0  # and the Gated DeltaNet state
        assert capsule.state_bytes == (capsule.conv_bytes + capsule.recurrent_bytes
                                       + capsule.mtp_bytes + capsule.meta_bytes)
        expected = generate(client, session_id)
        ok(client.restore('mid-plan'))  # rollback in place
        assert generate(client, session_id) == expected
        other = ok(client.append('Something else entirely, to fill the slot.')).session_id
        assert ok(client.restore('mid-plan', other)).session_id == other
        assert generate(client, other) == expected
        children = ok(client.branch('mid-plan', 2)).session_ids
        assert [generate(client, child) for child in children] == [expected, expected]
        ok(client.save('mid-plan'))
        return expected

    expected = run_node(tmp_path, f'{family}_a', context, model_dir, first_node)

    def after_restart(client):
        ok(client.load('mid-plan'))
        restored = ok(client.restore('mid-plan'))  # its session is gone: a new one
        return generate(client, restored.session_id)

    assert run_node(tmp_path, f'{family}_b', context, model_dir, after_restart) == expected
