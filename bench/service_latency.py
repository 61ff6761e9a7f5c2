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
Service latency percentiles of the real node over DDS while a generation runs.

Starts the installed ``policy_node`` with the installed parameters file (as the launch file
does), keeps one session generating, fires mixed calls from 4 client threads with
``capsule_ros.ros.load_probe.run_load`` and writes the percentiles per service as JSON.
"""

import argparse
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import threading

STARTUP_TIMEOUT_S = 180.0


def log(line):
    """Print progress on stderr."""
    print(f'[bench] {line}', file=sys.stderr, flush=True)


def main():
    """Run the probe and write its report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', required=True)
    parser.add_argument('--calls-per-thread', type=int, default=500)
    arguments = parser.parse_args()
    from ament_index_python.packages import get_package_prefix
    from capsule_ros.action import Generate
    from capsule_ros.ros.client import CapsuleClient
    from capsule_ros.ros.load_probe import run_load
    from capsule_ros.srv import Append
    import rclpy

    os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    prefix = Path(get_package_prefix('capsule_ros'))
    capsule_dir = tempfile.mkdtemp(prefix='capsule-bench-')
    command = [str(prefix / 'lib' / 'capsule_ros' / 'policy_node'), '--ros-args',
               '-r', '__node:=capsule', '--params-file',
               str(prefix / 'share' / 'capsule_ros' / 'config' / 'policy.yaml'),
               '-p', 'engine.max_seq_len:=2048', '-p', 'engine.max_sessions:=6',
               '-p', f'capsules.dir:={capsule_dir}']
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rclpy.init()
    client = CapsuleClient(timeout_s=30.0)
    try:
        log('waiting for the node ...')
        client.wait_until_active(STARTUP_TIMEOUT_S)
        busy = client.append('Count from 1 to 1000, one number per line.').session_id
        client.generate(Generate.Goal(session_id=busy, max_new_tokens=1))
        client.append(''.join(f'\n{number}' for number in range(2, 40)) + '\n',
                      session_id=busy, role=Append.Request.ROLE_RAW)
        client.snapshot(busy, label='busy-cap')
        idle = [client.append(f'Robot {index} waits at the dock.').session_id
                for index in range(2)]
        started = threading.Event()
        cancel = threading.Event()

        def generate():
            generator = CapsuleClient(timeout_s=30.0, client_name='bench_generator')
            try:
                generator.generate(Generate.Goal(session_id=busy, max_new_tokens=1500),
                                   cancel=cancel, on_feedback=lambda message: started.set())
            finally:
                generator.close()
                started.set()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        started.wait(timeout=120.0)
        log(f'{4 * arguments.calls_per_thread} mixed calls from 4 threads during a generation')
        report = run_load(idle_sessions=idle, busy_session=busy, busy_capsule='busy-cap',
                          num_threads=4, calls_per_thread=arguments.calls_per_thread,
                          timeout_s=30.0)
        cancel.set()
        thread.join(timeout=120.0)
        services = sorted({service for service, _ in report.codes})
        result = {'calls': report.calls, 'unanswered': report.unanswered,
                  'wrong': len(report.wrong), 'elapsed_s': report.elapsed_s,
                  'all': report.percentiles(),
                  'services': {service: report.percentiles(service) for service in services},
                  'codes': {f'{service}/{code}': count
                            for (service, code), count in sorted(report.codes.items())}}
        Path(arguments.out).write_text(json.dumps(result, indent=1))
    finally:
        client.close()
        rclpy.try_shutdown()
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()


if __name__ == '__main__':
    main()
