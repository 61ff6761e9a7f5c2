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
Start and stop the installed policy node the way launch/policy.launch.py does, for the tests.

Same executable from the install tree, the installed config/policy.yaml, the node name
``capsule``, plus ``-p`` overrides (as the launch file's arguments add them).
"""

import os
import pathlib
import signal
import subprocess
import sys

from ament_index_python.packages import get_package_prefix
from capsule_ros.ros.client import error_name
from capsule_ros.ros.client import NoAnswerError

PREFIX = pathlib.Path(get_package_prefix('capsule_ros'))
LIB = PREFIX / 'lib' / 'capsule_ros'
SHARE = PREFIX / 'share' / 'capsule_ros'
PARAMS_FILE = SHARE / 'config' / 'policy.yaml'
LAUNCH_FILE = SHARE / 'launch' / 'policy.launch.py'
# Model load takes ~5-10 s on 2 cores; a first-ever GGUF conversion ~45 s more.
STARTUP_TIMEOUT_S = 180.0
TIMEOUT_S = 30.0


def light_parameters(capsule_dir, dtype='bfloat16', budget_bytes=None, max_sessions=6):
    """Return ``-p`` overrides keeping a test node small: 2048-token slots, a temp dir."""
    overrides = {
        'model.dtype': dtype,
        'engine.max_seq_len': 2048,
        'engine.max_sessions': max_sessions,
        'capsules.dir': str(capsule_dir),
    }
    if budget_bytes is not None:
        overrides['capsules.budget_bytes'] = budget_bytes
    arguments = []
    for name, value in overrides.items():
        arguments += ['-p', f'{name}:={value}']
    return arguments


def process_environment():
    """Return the environment for node / CLI processes: this Python first on PATH."""
    environment = dict(os.environ)
    environment['PATH'] = os.pathsep.join(
        [os.path.dirname(sys.executable), environment.get('PATH', '')])
    return environment


class NodeProcess:
    """A running ``policy_node`` process whose output goes to a log file."""

    def __init__(self, log_path, *extra_ros_args):
        """Start the installed policy_node with the installed parameters file."""
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, 'w')
        command = [
            str(LIB / 'policy_node'), '--ros-args', '-r', '__node:=capsule',
            '--params-file', str(PARAMS_FILE), *extra_ros_args,
        ]
        self.process = subprocess.Popen(
            command, env=process_environment(), stdout=self._log, stderr=subprocess.STDOUT,
            text=True)

    def output(self):
        """Return everything the node has logged so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_until_active(self, client):
        """Wait until the node answers ``list``; fail with its log if it dies or never does."""
        try:
            return client.wait_until_active(
                STARTUP_TIMEOUT_S, is_alive=lambda: self.process.poll() is None)
        except NoAnswerError as error:
            raise AssertionError(f'{error}; policy_node exit status {self.process.poll()}:\n'
                                 f'{self.output()}') from None

    def stop(self):
        """Stop the node the way launch does: SIGINT, then SIGTERM, then SIGKILL."""
        for sig, grace_s in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        return self.process.returncode


def run_cli(*arguments, timeout_s=TIMEOUT_S):
    """Run the installed capsule_ctl; return the completed process."""
    return subprocess.run(
        [str(LIB / 'capsule_ctl'), '--timeout', str(timeout_s), *arguments],
        env=process_environment(), capture_output=True, text=True, timeout=10 * timeout_s)


def ok(response):
    """Assert a service response (or action result) succeeded; return it."""
    assert response.success, f'{error_name(response.error_code)}: {response.message}'
    return response


def generate_ok(client, session_id, max_new_tokens):
    """Continue ``session_id`` greedily over the Generate action; return the (ok) result."""
    from action_msgs.msg import GoalStatus
    status, result = client.generate(session_id=session_id, max_new_tokens=max_new_tokens)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    return ok(result)


def latest_diagnostics(client):
    """Wait up to 10 s for a /diagnostics message; return its one status's name and values."""
    from diagnostic_msgs.msg import DiagnosticArray
    received = []
    subscription = client.node.create_subscription(
        DiagnosticArray, '/diagnostics', received.append, 10)
    try:
        for _ in range(100):
            if received:
                break
            client.spin_once(0.1)
    finally:
        client.node.destroy_subscription(subscription)
    assert received, 'no /diagnostics message within 10 s'
    (status,) = received[-1].status
    return status.name, {item.key: item.value for item in status.values}


def greedy_in_process(model_dir, tmp_path, prompt, steps):
    """Greedy tokens after a raw ``prompt`` on the torch backend, fp32, in this process."""
    from capsule_ros.runtime.config import PolicyConfig
    from capsule_ros.runtime.engine import PolicyEngine
    engine = PolicyEngine(PolicyConfig.from_dict({
        'model': {'path': str(model_dir), 'dtype': 'float32'},
        'engine': {'max_seq_len': 512, 'max_sessions': 1},
        'capsules': {'dir': str(tmp_path / 'reference-capsules')}}), progress=None)
    session = engine.create_session(system_prompt=False)
    engine.append(session, prompt, role='raw')
    return list(engine.generate(session, steps, speculative='off').token_ids)
