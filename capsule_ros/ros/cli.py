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
``capsule_ctl``: command-line client of the policy node (rclpy, no ros2cli needed).

Exit status: 0 on success, 1 when the node answers with an error, 2 on bad usage, 3 when the
node does not answer in time.
"""

import argparse
import json
import sys

from capsule_ros.srv import ListCapsules
import rclpy
from rclpy.utilities import remove_ros_args

EXIT_OK = 0
EXIT_NODE_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

TIER_NAMES = {0: 'slot', 1: 'host', 2: 'disk'}


def build_parser():
    """Return the argument parser of ``capsule_ctl``."""
    parser = argparse.ArgumentParser(
        prog='capsule_ctl', description='Talk to a capsule_ros policy node over ROS 2.')
    parser.add_argument(
        '--node', default='/capsule',
        help='fully qualified node name whose services to call (default: %(default)s)')
    parser.add_argument(
        '--timeout', type=float, default=10.0,
        help='seconds to wait for the service and for its answer (default: %(default)s)')
    commands = parser.add_subparsers(dest='command', required=True)
    list_parser = commands.add_parser('list', help='list capsules, sessions and byte usage')
    list_parser.add_argument(
        '--session', default='', help='only capsules of this session (default: all)')
    list_parser.add_argument('--json', action='store_true', help='print one JSON object')
    return parser


def capsule_to_dict(capsule):
    """Convert a ``CapsuleInfo`` message to a JSON-ready dict."""
    return {
        'capsule_id': capsule.capsule_id,
        'parent_id': capsule.parent_id,
        'session_id': capsule.session_id,
        'label': capsule.label,
        'num_tokens': capsule.num_tokens,
        'kv_bytes': capsule.kv_bytes,
        'state_bytes': capsule.state_bytes,
        'shared_bytes': capsule.shared_bytes,
        'tier': TIER_NAMES.get(capsule.tier, str(capsule.tier)),
        'pinned': capsule.pinned,
        'resident_in_slot': capsule.resident_in_slot,
        'created': capsule.created.sec + capsule.created.nanosec * 1e-9,
        'model_fingerprint': capsule.model_fingerprint,
        'children': list(capsule.children),
    }


def call_service(node, service_type, name, request, timeout):
    """Call service ``name`` once; return the response, or None when it does not answer."""
    client = node.create_client(service_type, name)
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        return future.result() if future.done() else None
    finally:
        node.destroy_client(client)


def run_list(node, arguments, out):
    """Run ``capsule_ctl list``; return the exit status."""
    request = ListCapsules.Request(session_id=arguments.session)
    service = f'{arguments.node.rstrip("/")}/list'
    response = call_service(node, ListCapsules, service, request, arguments.timeout)
    if response is None:
        print(f'capsule_ctl: no answer from {service} within {arguments.timeout} s '
              '(is policy_node running and active, with the same ROS_DOMAIN_ID?)',
              file=sys.stderr)
        return EXIT_TIMEOUT
    if not response.success:
        print(f'capsule_ctl: {service} failed (error_code {response.error_code}): '
              f'{response.message}', file=sys.stderr)
        return EXIT_NODE_ERROR
    capsules = [capsule_to_dict(capsule) for capsule in response.capsules]
    if arguments.json:
        json.dump({
            'capsules': capsules,
            'sessions': list(response.sessions),
            'budget_bytes': response.budget_bytes,
            'used_bytes': response.used_bytes,
        }, out)
        out.write('\n')
        return EXIT_OK
    out.write(f'{len(capsules)} capsule(s), {len(response.sessions)} session(s), '
              f'{response.used_bytes} of {response.budget_bytes} bytes used\n')
    for capsule in capsules:
        out.write(f"{capsule['capsule_id']:<24} {capsule['label']:<16} "
                  f"{capsule['num_tokens']:>6} tok  {capsule['tier']:<4} "
                  f"{'pinned' if capsule['pinned'] else ''}\n")
    return EXIT_OK


COMMANDS = {'list': run_list}


def main(argv=None):
    """Entry point of the ``capsule_ctl`` executable; return the exit status."""
    argv = sys.argv if argv is None else argv
    arguments = build_parser().parse_args(remove_ros_args(argv)[1:])
    rclpy.init(args=argv)
    node = rclpy.create_node('capsule_ctl')
    try:
        return COMMANDS[arguments.command](node, arguments, sys.stdout)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
