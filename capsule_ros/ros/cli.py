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

Subcommands mirror the node's interfaces: ``generate``, ``append``, ``snapshot``, ``restore``,
``branch``, ``list`` (lineage tree), ``release``, ``save``, ``load``, ``close``. Output is
human-readable by default, one JSON object with ``--json``.

Exit status: 0 on success, 1 when the node answers with an error, 2 on bad usage, 3 when the
node does not answer in time, 130 when a generation was interrupted (Ctrl-C cancels the goal).
"""

import argparse
import json
import sys
import threading

from action_msgs.msg import GoalStatus
from capsule_ros.action import Generate
from capsule_ros.msg import SamplingParams
from capsule_ros.ros.client import CapsuleClient
from capsule_ros.ros.client import error_name
from capsule_ros.ros.client import NoAnswerError
from capsule_ros.ros.client import STOP_REASON_NAMES
import rclpy
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

EXIT_OK = 0
EXIT_NODE_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

TIER_NAMES = {0: 'slot', 1: 'host', 2: 'disk'}
ROLES = {'user': 0, 'system': 1, 'observation': 2, 'raw': 3}
UINT32_MAX = 2 ** 32 - 1


def uint32(text):
    """Parse an integer in [0, 2^32 - 1] for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer')
    if not 0 <= value <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f'{value} must be in [0, {UINT32_MAX}]')
    return value


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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--json', action='store_true', help='print one JSON object')
    commands = parser.add_subparsers(dest='command', required=True)

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, parents=[common])

    generate = command('generate', 'append a prompt and generate; tokens stream to stdout')
    generate.add_argument('prompt', help="text to append; '' = continue the session as is")
    generate.add_argument('--session', default='', help='session to continue (default: new)')
    generate.add_argument('--role', choices=ROLES, default='user', help='role of the prompt')
    generate.add_argument('--max-new-tokens', type=uint32, default=0,
                          help='0 = the node default (generation.max_new_tokens)')
    generate.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
    generate.add_argument('--top-k', type=uint32, default=0, help='0 = off')
    generate.add_argument('--top-p', type=float, default=1.0, help='1.0 = off')
    generate.add_argument('--seed', type=int, default=SamplingParams.SEED_UNSET,
                          help='RNG seed; -1 = keep the session RNG')
    generate.add_argument('--stop', action='append', default=[], help='stop string (repeat)')
    generate.add_argument('--snapshot-after', action='store_true',
                          help='take a capsule of the session when generation ends')
    generate.add_argument('--label', default='', help='label (= id) of that capsule')
    generate.add_argument('--pin', action='store_true', help='pin that capsule')
    generate.add_argument('--result-timeout', type=float, default=600.0,
                          help='seconds to wait for the whole generation (default: %(default)s)')

    append = command('append', 'append a prompt to a session without generating')
    append.add_argument('prompt', help='text to append')
    append.add_argument('--session', default='', help='session (default: a new one)')
    append.add_argument('--role', choices=ROLES, default='user', help='role of the prompt')

    snapshot = command('snapshot', 'take a capsule of a session')
    snapshot.add_argument('session', help='session to snapshot')
    snapshot.add_argument('--label', default='', help="capsule label (= its id); '' = cap-N")
    snapshot.add_argument('--pin', action='store_true', help='exempt from eviction')

    restore = command('restore', 'restore a capsule into a session')
    restore.add_argument('capsule', help='capsule id (or label)')
    restore.add_argument('--session', default='',
                         help="target session; '' = the capsule's own (or a new one)")

    branch = command('branch', 'fork a capsule into new sessions')
    branch.add_argument('capsule', help='capsule id (or label)')
    branch.add_argument('num_branches', type=uint32, help='number of new sessions')

    list_parser = command('list', 'list capsules as a lineage tree, sessions and byte usage')
    list_parser.add_argument(
        '--session', default='', help='only capsules of this session (default: all)')

    release = command('release', 'release a capsule and free its bytes')
    release.add_argument('capsule', help='capsule id (or label)')

    save = command('save', 'write a capsule to the capsule directory')
    save.add_argument('capsule', help='capsule id (or label)')
    save.add_argument('--name', default='', help="file name; '' = the capsule id")

    load = command('load', 'load a saved capsule (id = its name)')
    load.add_argument('name', help='name of the saved capsule')

    close = command('close', 'close a session and free its slot')
    close.add_argument('session', help='session to close')
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
        'conv_bytes': capsule.conv_bytes,
        'recurrent_bytes': capsule.recurrent_bytes,
        'mtp_bytes': capsule.mtp_bytes,
        'meta_bytes': capsule.meta_bytes,
        'shared_bytes': capsule.shared_bytes,
        'tier': TIER_NAMES.get(capsule.tier, str(capsule.tier)),
        'pinned': capsule.pinned,
        'resident_in_slot': capsule.resident_in_slot,
        'created': capsule.created.sec + capsule.created.nanosec * 1e-9,
        'model_fingerprint': capsule.model_fingerprint,
        'children': list(capsule.children),
    }


def message_to_dict(message):
    """Convert a response / result message to a JSON-ready dict (named codes, capsules)."""
    answer = {}
    for field in message.get_fields_and_field_types():
        value = getattr(message, field)
        if field == 'error_code':
            value = error_name(value)
        elif field == 'stop_reason':
            value = STOP_REASON_NAMES.get(value, str(value))
        elif field in ('capsule',):
            value = capsule_to_dict(value) if value.capsule_id else None
        elif field == 'capsules':
            value = [capsule_to_dict(capsule) for capsule in value]
        elif not isinstance(value, (bool, int, float, str)):
            value = list(value)
        answer[field] = value
    return answer


def mib(num_bytes):
    """Format bytes as MiB."""
    return f'{num_bytes / (1 << 20):.1f} MiB'


def capsule_line(capsule):
    """One human-readable line describing a capsule dict."""
    flags = ' '.join(flag for flag, on in (
        ('pinned', capsule['pinned']), ('in-slot', capsule['resident_in_slot'])) if on)
    label = f" '{capsule['label']}'" if capsule['label'] and (
        capsule['label'] != capsule['capsule_id']) else ''
    kinds = ', '.join(f'{kind} {mib(capsule[kind + "_bytes"])}' for kind in (
        'kv', 'conv', 'recurrent', 'mtp', 'meta') if capsule.get(kind + '_bytes'))
    return (f"{capsule['capsule_id']}{label}  session {capsule['session_id']}  "
            f"{capsule['num_tokens']} tok  {mib(capsule['kv_bytes'] + capsule['state_bytes'])}"
            f" ({kinds})  {capsule['tier']}{'  ' + flags if flags else ''}")


def lineage_tree(capsules):
    """Return the lines of the capsule lineage tree (roots = capsules without a live parent)."""
    by_id = {capsule['capsule_id']: capsule for capsule in capsules}
    children = {}
    roots = []
    for capsule in sorted(capsules, key=lambda item: item['created']):
        parent = capsule['parent_id']
        if parent in by_id:
            children.setdefault(parent, []).append(capsule)
        else:
            roots.append(capsule)
    lines = []

    def walk(capsule, prefix, connector, child_prefix):
        lines.append(prefix + connector + capsule_line(capsule))
        kids = children.get(capsule['capsule_id'], [])
        for index, kid in enumerate(kids):
            last = index == len(kids) - 1
            walk(kid, prefix + child_prefix, '└── ' if last else '├── ',
                 '    ' if last else '│   ')

    for root in roots:
        if root['parent_id']:
            root = dict(root, capsule_id=f"{root['capsule_id']} (parent {root['parent_id']} "
                                         f'gone)')
        walk(root, '', '', '')
    return lines


def human(command, response):
    """Return the human-readable answer of a successful ``command``."""
    if command == 'list':
        capsules = [capsule_to_dict(capsule) for capsule in response.capsules]
        lines = [f'{len(capsules)} capsule(s), {len(response.sessions)} session(s), '
                 f'{mib(response.used_bytes)} of {mib(response.budget_bytes)} used '
                 f'({response.used_bytes} of {response.budget_bytes} bytes)']
        lines += lineage_tree(capsules)
        if response.sessions:
            lines.append('sessions: ' + ' '.join(response.sessions))
        if response.saved:
            lines.append('saved (load by name): ' + ' '.join(response.saved))
        return '\n'.join(lines)
    if command in ('snapshot', 'load'):
        return (f'{command}: {capsule_line(capsule_to_dict(response.capsule))} '
                f'({response.latency_ms:.1f} ms)')
    if command == 'restore':
        return (f'restored into session {response.session_id}: {response.num_tokens} tokens, '
                f'{response.copied_bytes} bytes copied ({response.latency_ms:.1f} ms)')
    if command == 'branch':
        return (f'branched into {" ".join(response.session_ids)} '
                f'({response.latency_ms:.1f} ms)')
    if command == 'release':
        return f'released, {response.freed_bytes} bytes freed'
    if command == 'save':
        return (f'saved to {response.path} ({response.bytes_written} bytes, '
                f'{response.latency_ms:.1f} ms)')
    if command == 'close':
        return f"closed; open sessions: {' '.join(response.sessions) or 'none'}"
    if command == 'append':
        return (f'session {response.session_id}: +{response.num_tokens} tokens, now '
                f'{response.position} ({response.latency_ms:.1f} ms)')
    raise ValueError(command)


def service_request(client, arguments):
    """Call the service of a non-generate subcommand; return the response."""
    command = arguments.command
    if command == 'list':
        return client.list_capsules(arguments.session)
    if command == 'snapshot':
        return client.snapshot(arguments.session, arguments.label, arguments.pin)
    if command == 'restore':
        return client.restore(arguments.capsule, arguments.session)
    if command == 'branch':
        return client.branch(arguments.capsule, arguments.num_branches)
    if command == 'release':
        return client.release(arguments.capsule)
    if command == 'save':
        return client.save(arguments.capsule, arguments.name)
    if command == 'load':
        return client.load(arguments.name)
    if command == 'close':
        return client.close_session(arguments.session)
    if command == 'append':
        return client.append(arguments.prompt, arguments.session, ROLES[arguments.role])
    raise ValueError(command)


def run_service(client, arguments, out):
    """Run a service subcommand; return the exit status."""
    response = service_request(client, arguments)
    if arguments.json:
        json.dump(message_to_dict(response), out)
        out.write('\n')
    elif response.success:
        out.write(human(arguments.command, response) + '\n')
    if not response.success:
        print(f'capsule_ctl: {arguments.command} failed: {error_name(response.error_code)}: '
              f'{response.message}', file=sys.stderr)
        return EXIT_NODE_ERROR
    return EXIT_OK


def run_generate(client, arguments, out):
    """Run ``generate``: stream tokens (human mode), Ctrl-C cancels; return the exit status."""
    goal = Generate.Goal(
        session_id=arguments.session, prompt=arguments.prompt, role=ROLES[arguments.role],
        max_new_tokens=arguments.max_new_tokens,
        sampling=SamplingParams(temperature=arguments.temperature, top_k=arguments.top_k,
                                top_p=arguments.top_p, seed=arguments.seed),
        stop=arguments.stop, snapshot_after=arguments.snapshot_after, label=arguments.label,
        pin=arguments.pin)
    cancel = threading.Event()
    interrupted = False

    def on_feedback(feedback):
        if not arguments.json:
            out.write(feedback.text_delta)
            out.flush()

    while True:
        try:
            status, result = client.generate(goal, on_feedback=on_feedback, cancel=cancel,
                                             result_timeout_s=arguments.result_timeout)
            break
        except KeyboardInterrupt:  # cancel the goal, then wait for its (partial) result
            interrupted = True
            cancel.set()
    if result is None:
        print('capsule_ctl: generate goal rejected by the node', file=sys.stderr)
        return EXIT_NODE_ERROR
    if arguments.json:
        answer = message_to_dict(result)
        answer['status'] = {GoalStatus.STATUS_SUCCEEDED: 'succeeded',
                            GoalStatus.STATUS_CANCELED: 'canceled',
                            GoalStatus.STATUS_ABORTED: 'aborted'}.get(status, str(status))
        json.dump(answer, out)
        out.write('\n')
    elif result.success:
        capsule = f', capsule {result.capsule.capsule_id}' if result.capsule.capsule_id else ''
        drafts = (f', {result.accepted_tokens}/{result.drafted_tokens} drafts accepted'
                  if result.drafted_tokens else '')
        out.write(f'\n[session {result.session_id}: {result.prompt_tokens} prompt + '
                  f'{result.generated_tokens} generated tokens, stop '
                  f'{STOP_REASON_NAMES.get(result.stop_reason)}, TTFT {result.ttft_ms:.0f} ms, '
                  f'{result.tokens_per_second:.1f} tok/s{drafts}{capsule}]\n')
    if not result.success:
        print(f'capsule_ctl: generate failed: {error_name(result.error_code)}: '
              f'{result.message}', file=sys.stderr)
        return EXIT_NODE_ERROR
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def main(argv=None):
    """Entry point of the ``capsule_ctl`` executable; return the exit status."""
    argv = sys.argv if argv is None else argv
    arguments = build_parser().parse_args(remove_ros_args(argv)[1:])
    # No rclpy SIGINT handler: Ctrl-C must reach run_generate, which cancels the goal.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    client = CapsuleClient(arguments.node, arguments.timeout, client_name='capsule_ctl')
    try:
        if arguments.command == 'generate':
            return run_generate(client, arguments, sys.stdout)
        return run_service(client, arguments, sys.stdout)
    except NoAnswerError as error:
        print(f'capsule_ctl: {error}', file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        client.close()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
