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
The node with ``backend.kind:=onnxruntime``, over real DDS.

Same services and action as on torch: a generation's tokens equal the torch backend's (an
engine in this process on the same checkpoint), a capsule taken on the graph continues exactly
after a restore and a branch, and /diagnostics names the backend.
"""

from capsule_ros.ros.client import CapsuleClient
from capsule_ros.runtime.testing import write_tiny_model
from capsule_ros.srv import Append
from node_process import generate_ok
from node_process import greedy_in_process
from node_process import latest_diagnostics
from node_process import light_parameters
from node_process import NodeProcess
from node_process import ok

TIMEOUT_S = 60.0
PROMPT = 'Route: dock, aisle 2, shelf C, aisle 2, dock. Route: dock, aisle 4,'


def test_node_on_onnxruntime_serves_capsules_over_dds(tmp_path, context):
    model_dir = write_tiny_model(tmp_path / 'llama')
    process = NodeProcess(tmp_path / 'node.log',
                          *light_parameters(tmp_path / 'capsules', dtype='float32'),
                          '-p', f'model.path:={model_dir}', '-p', 'engine.max_seq_len:=512',
                          '-p', f'model.cache_dir:={tmp_path / "cache"}',
                          '-p', 'backend.kind:=onnxruntime')
    client = CapsuleClient(timeout_s=TIMEOUT_S, context=context, client_name='onnxruntime')
    try:
        process.wait_until_active(client)
        session_id = ok(client.append(PROMPT, role=Append.Request.ROLE_RAW)).session_id
        first = generate_ok(client, session_id, 24)
        assert list(first.token_ids) == greedy_in_process(model_dir, tmp_path, PROMPT, 24)
        ok(client.snapshot(session_id, label='on-the-graph'))
        expected = generate_ok(client, session_id, 12)
        ok(client.restore('on-the-graph'))
        assert list(generate_ok(client, session_id, 12).token_ids) == list(expected.token_ids)
        child = ok(client.branch('on-the-graph', 1)).session_ids[0]
        assert list(generate_ok(client, child, 12).token_ids) == list(expected.token_ids)

        _, values = latest_diagnostics(client)
        assert values['backend'] == 'onnxruntime/cpu'
    finally:
        client.close()
        assert process.stop() is not None
        assert 'Traceback' not in process.output(), process.output()
