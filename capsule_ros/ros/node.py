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
The policy node: capsule services, the generate action, the events and diagnostics topics.

Callbacks stay short: convert the request, call one engine verb, fill the response
(``convert`` maps results and errors). Concurrency is declared by callback groups and run by a
``MultiThreadedExecutor``:

- the capsule verbs that change state (snapshot, restore, branch, release, save, load,
  close_session) share one ``MutuallyExclusiveCallbackGroup``: they are short (bookkeeping and
  memory copies) and run one at a time;
- ``list`` and the diagnostics timer sit in a ``ReentrantCallbackGroup`` and never wait behind
  anything but the engine's short bookkeeping lock;
- the generate action and ``append`` (long work on one session: prefill and decode) sit in a
  second ``ReentrantCallbackGroup``, so each goal runs in its own executor thread.

A verb on a session that another operation holds (usually a running generation) is answered at
once with ``BUSY`` and a message; it never waits. Other sessions are not blocked by it.

The executor is sized once for the largest ``engine.max_sessions`` the parameter allows, plus a
reserve; at most ``engine.max_sessions`` generations and appends run at once (more are answered
``BUSY``), so cancel requests and the read-only services always find a thread, whatever a
reconfigure sets.

Deactivate and shutdown (also on SIGINT / SIGTERM) stop accepting work, stop the running
generations and appends (between tokens, between prefill chunks), wait (bounded) until every
goal's result and every service response has been sent, and only then destroy the servers.
"""

import math
import signal
import sys
import threading
import time

from capsule_ros.action import Generate
from capsule_ros.msg import CapsuleEvent
from capsule_ros.ros.convert import capsule_message
from capsule_ros.ros.convert import error_code_of
from capsule_ros.ros.convert import event_message
from capsule_ros.ros.convert import fill_error
from capsule_ros.ros.convert import fill_ok
from capsule_ros.ros.convert import role_of
from capsule_ros.ros.convert import STOP_REASONS
from capsule_ros.ros.parameters import AUTOSTART_PARAMETER
from capsule_ros.ros.parameters import declare_parameters
from capsule_ros.ros.parameters import MAX_SESSIONS_LIMIT
from capsule_ros.ros.parameters import policy_config
from capsule_ros.ros.parameters import read_parameters
from capsule_ros.ros.parameters import set_refusal
from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.engine import PolicyEngine
from capsule_ros.runtime.engine import StopReason
from capsule_ros.runtime.errors import CapsuleRosError
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.errors import PrefillCanceledError
from capsule_ros.srv import Append
from capsule_ros.srv import Branch
from capsule_ros.srv import CloseSession
from capsule_ros.srv import ListCapsules
from capsule_ros.srv import LoadCapsule
from capsule_ros.srv import ReleaseCapsule
from capsule_ros.srv import Restore
from capsule_ros.srv import SaveCapsule
from capsule_ros.srv import Snapshot
from diagnostic_msgs.msg import DiagnosticArray
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_msgs.msg import KeyValue
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.action import ActionServer
from rclpy.action import CancelResponse
from rclpy.action import GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile
from rclpy.qos import ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

NODE_NAME = 'capsule'
ENGINE_NOT_AVAILABLE = 'engine not available: the node is not configured and active'
DEACTIVATING = 'the node is deactivating'
SHUTTING_DOWN = 'the node is shutting down'

# Service name (under the node's private namespace '~/') -> type, for the verbs that change
# engine state and share the mutually exclusive callback group.
MUTATING_SERVICES = {
    'snapshot': Snapshot,
    'restore': Restore,
    'branch': Branch,
    'release': ReleaseCapsule,
    'save': SaveCapsule,
    'load': LoadCapsule,
    'close_session': CloseSession,
}
# Services in the reentrant groups: 'list' (read-only) and 'append' (prefill, long work).
OTHER_SERVICES = {'list': ListCapsules, 'append': Append}

DIAGNOSTICS_PERIOD_S = 1.0
# Executor threads beyond one per possible generation: services, timer, action bookkeeping.
RESERVED_THREADS = 4
# Sized once, for the largest engine.max_sessions (a reconfigure may raise it); Python's thread
# pool starts a thread only when no idle one is left, so unused capacity costs nothing.
EXECUTOR_THREADS = MAX_SESSIONS_LIMIT + RESERVED_THREADS
# How long deactivate / shutdown wait for running work to stop and its answers to be sent.
DRAIN_TIMEOUT_S = 30.0
# A goal accepted by the goal callback reaches the accepted callback within this time unless
# rclpy failed to create or announce it (then it never does and is not waited for).
ACCEPT_GRACE_S = 2.0
# Clients ask for a goal's result right after its acceptance, but that request may still be on
# its way when the goal is stopped: closing waits this long for the requests of such goals.
RESULT_REQUEST_GRACE_S = 2.0
DRAIN_POLL_S = 0.1
EVENTS_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


class NotAvailableError(CapsuleRosError):
    """The node stopped or refused the work: it is not active, deactivating or shutting down."""

    code = 'NOT_AVAILABLE'


class WorkLimitError(CapsuleRosError):
    """As many generations and appends run as ``engine.max_sessions`` allows."""

    code = 'BUSY'


def _require(value, field):
    """Raise ``InvalidArgumentError`` when a required string field is empty."""
    if not value:
        raise InvalidArgumentError(f'{field} must not be empty')
    return value


class GoalCancel:
    """
    Cancel flag of one goal, passed to the engine (which only calls ``is_set``).

    Set when the client canceled the goal (read from the goal handle, so the goal's status is
    CANCELING whenever the engine sees it) or when the node stops its work (``stop``).
    """

    def __init__(self, goal_handle):
        """Start unset."""
        self._goal_handle = goal_handle
        self.stop = threading.Event()

    def is_set(self):
        """Whether the generation (or its prompt prefill) must stop."""
        return self.stop.is_set() or self._goal_handle.is_cancel_requested


class GenerateActionServer(ActionServer):
    """
    The generate action server; tells the node when rclpy is done with a goal.

    rclpy sets a goal's result at the end of its ``_execute_goal`` coroutine, after the
    execute callback has returned, and sends it to each get_result request in an executor
    task of its own (the result future's done callback, ``_send_result_response``). The node
    may destroy the server (deactivate, shutdown) only after those sends, or the client never
    gets its result ("Failed to send result response"). This wraps those three private rclpy
    methods (the same in Jazzy and Kilted): ``on_goal_done(goal_id)`` is called when a goal's
    execution has ended and its result is set, ``on_result_requested(goal_id)`` when a
    get_result request for a known goal arrives, and ``pending_result_sends`` counts those
    requests not answered yet.
    """

    def __init__(self, node, *args, on_goal_done, on_result_requested, **kwargs):
        """Create the server; the callbacks get goal ids (bytes)."""
        self._on_goal_done = on_goal_done
        self._on_result_requested = on_result_requested
        self._sends_lock = threading.Lock()
        self._pending_result_sends = 0
        super().__init__(node, *args, **kwargs)

    @property
    def pending_result_sends(self):
        """Get_result requests of known goals whose response is not sent yet."""
        with self._sends_lock:
            return self._pending_result_sends

    async def _execute_goal(self, execute_callback, goal_handle):
        try:
            await super()._execute_goal(execute_callback, goal_handle)
        finally:
            self._on_goal_done(bytes(goal_handle.goal_id.uuid))

    async def _execute_get_result_request(self, request_header_and_message):
        # A known goal gets a send callback on its result future: one _send_result_response.
        goal_id = bytes(request_header_and_message[1].goal_id.uuid)
        if goal_id in self._goal_handles:
            with self._sends_lock:
                self._pending_result_sends += 1
            self._on_result_requested(goal_id)
        await super()._execute_get_result_request(request_header_and_message)

    def _send_result_response(self, request_header, future):
        try:
            super()._send_result_response(request_header, future)
        finally:
            with self._sends_lock:
                self._pending_result_sends -= 1
            self._on_goal_done(b'')


class PolicyNode(LifecycleNode):
    """
    Lifecycle node named ``capsule`` that serves capsules of one policy engine.

    on_configure reads the parameters and loads the engine, on_activate opens the services,
    the action and the events topic, on_deactivate closes them (stopping running work and
    answering it first), on_cleanup frees the engine. /diagnostics is published in every
    state: the engine status, or why the last configure failed.
    """

    def __init__(self, executor_threads=EXECUTOR_THREADS, **kwargs):
        """Declare parameters, start diagnostics; no capsule interface is open yet."""
        super().__init__(NODE_NAME, **kwargs)
        # Attribute names must not shadow rclpy.Node's own (it keeps _parameters and _services).
        self._config = None
        self._engine = None  # the runtime PolicyEngine while configured
        self._lifecycle_state = 'unconfigured'
        self._configure_error = ''  # why the last configure failed; '' after a success
        self._executor_threads = executor_threads
        self._work_limit = 0  # generations + appends at once: engine.max_sessions, at most
        self._mutating_group = MutuallyExclusiveCallbackGroup()
        self._query_group = ReentrantCallbackGroup()
        self._session_work_group = ReentrantCallbackGroup()
        self._events_publisher = None
        self._publish_lock = threading.Lock()
        self._capsule_services = []
        self._generate_server = None
        self._interfaces_lock = threading.Lock()  # opening / closing the interfaces
        # Work bookkeeping, under _work_lock: whether new work is accepted, why not, the goals
        # rclpy has not finished (goal id -> GoalCancel), goals between the goal and accepted
        # callbacks (acceptance times), cancel events of running appends, generations and
        # appends running, service requests whose response is not sent yet.
        self._work_lock = threading.Lock()
        self._work_done = threading.Condition(self._work_lock)
        self._open = False
        self._closed_reason = ENGINE_NOT_AVAILABLE
        self._goals = {}
        self._goals_accepting = []
        # goal id -> when its execution ended (None: running), for goals whose result nobody
        # has requested yet; forgotten RESULT_REQUEST_GRACE_S after they ended
        self._results_unrequested = {}
        self._appends = set()
        self._running_work = 0
        self._requests_in_flight = 0
        self._startup_refusals = {}
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._startup_refusals.update(declare_parameters(self))
        for reason in self._startup_refusals.values():
            self.get_logger().error(reason)
        self._diagnostics_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            DIAGNOSTICS_PERIOD_S, self._publish_diagnostics, callback_group=self._query_group)

    @property
    def autostart(self):
        """Whether the node configures and activates itself when started."""
        return self.get_parameter(AUTOSTART_PARAMETER).value

    # Parameters.

    def _on_set_parameters(self, parameters):
        """Refuse a set with a reason, or accept it (it is applied at the next configure)."""
        configured_state = self._lifecycle_state if self._config is not None else ''
        for parameter in parameters:
            reason = set_refusal(parameter.name, parameter.value, configured_state)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        for parameter in parameters:
            self._startup_refusals.pop(parameter.name, None)
        return SetParametersResult(successful=True)

    # Lifecycle transitions.

    def on_configure(self, state):
        """Read the parameters into the runtime's config, load the model, allocate slots."""
        if self._startup_refusals:
            return self._configure_failed('; '.join(self._startup_refusals.values()))
        try:
            config = policy_config(read_parameters(self))
        except InvalidArgumentError as error:
            return self._configure_failed(str(error))
        try:
            engine = PolicyEngine(
                config, progress=self.get_logger().info, on_event=self._publish_event)
        except Exception as error:  # any load failure must fail configure, not the process
            return self._configure_failed(
                f'({error_code_of(error)}) {type(error).__name__}: {error}')
        self._config, self._engine = config, engine
        self._work_limit = min(config.engine.max_sessions,
                               self._executor_threads - RESERVED_THREADS)
        self._events_publisher = self.create_lifecycle_publisher(
            CapsuleEvent, '~/events', EVENTS_QOS)
        self._configure_error = ''
        self._lifecycle_state = 'inactive'
        self.get_logger().info(
            f'configured: {engine.model_name} ({config.model.dtype}) on '
            f'{config.backend.kind}/{config.backend.device}, {config.engine.max_sessions} '
            f'sessions x {config.engine.max_seq_len} tokens, fingerprint '
            f'{engine.fingerprint}')
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, reason):
        """Log the reason, keep it for /diagnostics (the CLI's view), publish it now."""
        self._configure_error = reason
        self.get_logger().error(f'configure failed: {reason}')
        self._publish_diagnostics()
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state):
        """Open the services and the generate action; accept work."""
        with self._interfaces_lock:
            for name, service_type in MUTATING_SERVICES.items():
                self._open_service(service_type, name, getattr(self, f'_{name}_callback'),
                                   self._mutating_group)
            self._open_service(ListCapsules, 'list', self._list_callback, self._query_group)
            self._open_service(Append, 'append', self._append_callback,
                               self._session_work_group)
            self._generate_server = GenerateActionServer(
                self, Generate, '~/generate', self._generate_execute,
                goal_callback=self._generate_goal, cancel_callback=self._generate_cancel,
                handle_accepted_callback=self._generate_accepted,
                callback_group=self._session_work_group, on_goal_done=self._generate_done,
                on_result_requested=self._result_requested)
            with self._work_lock:
                self._open = True
        result = super().on_activate(state)
        self._lifecycle_state = 'active'
        self.get_logger().info('active: services and action open')
        return result

    def on_deactivate(self, state):
        """Stop running work and answer it, close the interfaces; keep the engine."""
        self._close_interfaces(DEACTIVATING)
        self._lifecycle_state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        """Close everything and free the engine (weights, slots, capsules in memory)."""
        self._release(DEACTIVATING, 'unconfigured')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        """Close everything on shutdown from any state, answering running work first."""
        self._release(SHUTTING_DOWN, 'finalized')
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        """Close and free everything after a failed transition; go back to unconfigured."""
        self.get_logger().error(f'a lifecycle transition failed in {state.label}; cleaning up')
        self._release(SHUTTING_DOWN, 'unconfigured')
        return TransitionCallbackReturn.SUCCESS

    def shut_down(self):
        """
        Take the node to finalized from any state, while the executor still spins.

        The lifecycle shutdown transition when one is possible; otherwise (finalized already,
        or in the middle of another transition) the same closing directly.
        """
        try:
            if self.trigger_shutdown() == TransitionCallbackReturn.SUCCESS:
                return
        except RuntimeError:  # rclpy's RCLError: no shutdown transition from this state
            pass
        self._release(SHUTTING_DOWN, 'finalized')

    def _release(self, reason, final_state):
        self._close_interfaces(reason)
        with self._publish_lock:
            if self._events_publisher is not None:
                self.destroy_lifecycle_publisher(self._events_publisher)
            self._events_publisher = None
        self._engine = None
        self._config = None
        self._lifecycle_state = final_state

    def _close_interfaces(self, reason):
        """Refuse new work, stop running work, wait until every answer is sent, close."""
        with self._interfaces_lock:
            with self._work_done:
                self._open = False
                self._closed_reason = reason
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while True:
                    for cancel in self._goals.values():
                        cancel.stop.set()
                    for cancel in self._appends:
                        cancel.set()
                    running = self._running_description()
                    remaining_s = deadline - time.monotonic()
                    if not running or remaining_s <= 0:
                        break
                    self._work_done.wait(timeout=min(remaining_s, DRAIN_POLL_S))
                self._results_unrequested.clear()  # their server goes now
            if running:
                self.get_logger().warning(
                    f'{reason}: closing the interfaces after {DRAIN_TIMEOUT_S:.0f} s with '
                    f'{running} still running; their answers may be lost')
            for service in self._capsule_services:
                self.destroy_service(service)
            self._capsule_services = []
            if self._generate_server is not None:
                self._generate_server.destroy()
                self._generate_server = None

    def _running_description(self):
        """Describe the work whose answer is not sent yet ('' = none); caller holds the lock."""
        now = time.monotonic()
        self._goals_accepting = [at for at in self._goals_accepting if now - at < ACCEPT_GRACE_S]
        self._forget_unrequested(now)
        server = self._generate_server
        parts = [(len(self._goals) + len(self._goals_accepting), 'goal(s)'),
                 (server.pending_result_sends if server is not None else 0, 'goal result(s)'),
                 (len(self._results_unrequested), 'goal result(s) not requested yet'),
                 (self._requests_in_flight, 'service request(s)')]
        return ', '.join(f'{count} {what}' for count, what in parts if count)

    # Work bookkeeping.

    def _begin_work(self, what, append_cancel=None):
        """Count one generation or append in; raise if the node refuses it now."""
        with self._work_lock:
            if not self._open:
                raise NotAvailableError(f'{what} refused: {self._closed_reason}')
            if self._running_work >= self._work_limit:
                raise WorkLimitError(
                    f'{what} refused: {self._running_work} generations and appends already '
                    f'run, as many as engine.max_sessions={self._work_limit} allows; retry '
                    f'when one ends')
            self._running_work += 1
            if append_cancel is not None:
                self._appends.add(append_cancel)

    def _end_work(self, append_cancel=None):
        with self._work_done:
            self._running_work -= 1
            self._appends.discard(append_cancel)
            self._work_done.notify_all()

    def _stopped_reason(self):
        """Why running work was stopped (the node's closing reason)."""
        with self._work_lock:
            return self._closed_reason

    def _open_service(self, service_type, name, callback, callback_group):
        """
        Create service ``~/name`` whose requests count as in flight until the response is sent.

        rclpy's executor sends the response after the callback returns; closing waits for
        that. A response that still meets a destroyed service is logged, never raised (an
        exception there would stop the executor).
        """
        def tracked_callback(request, response):
            with self._work_lock:
                self._requests_in_flight += 1
            try:
                return callback(request, response)
            except BaseException:
                self._request_done()
                raise

        service = self.create_service(service_type, f'~/{name}', tracked_callback,
                                      callback_group=callback_group)
        send_response = service.send_response

        def tracked_send_response(response, header):
            try:
                send_response(response, header)
            except RuntimeError as error:  # rclpy's InvalidHandle / RCLError
                self.get_logger().warning(f'response of ~/{name} lost: {error}')
            finally:
                self._request_done()

        service.send_response = tracked_send_response
        self._capsule_services.append(service)

    def _request_done(self):
        with self._work_done:
            self._requests_in_flight -= 1
            self._work_done.notify_all()

    # Topics.

    def _publish_event(self, event):
        """Engine listener: one CapsuleEvent message per capsule event (any thread)."""
        with self._publish_lock:
            publisher = self._events_publisher
            if publisher is None or not publisher.is_activated:
                return
            publisher.publish(event_message(event, self.get_clock().now().to_msg()))

    def _publish_diagnostics(self):
        """Publish one DiagnosticStatus: the engine's status, or why configure failed."""
        engine, config = self._engine, self._config
        values = {'state': self._lifecycle_state,
                  'last_configure_error': self._configure_error}
        if engine is None or config is None:
            level = DiagnosticStatus.ERROR if self._configure_error else DiagnosticStatus.OK
            message = (f'configure failed: {self._configure_error}' if self._configure_error
                       else f'{self._lifecycle_state}: no engine loaded')
            hardware_id = ''
        else:
            capsules = engine.list_capsules()
            budget = engine.store.budget_bytes
            used = engine.store.used_bytes
            with self._work_lock:
                generating = len(self._goals)
            values.update({
                'model': engine.model_name,
                'fingerprint': engine.fingerprint,
                'dtype': config.model.dtype,
                'backend': f'{config.backend.kind}/{config.backend.device}',
                'budget_bytes': budget,
                'used_bytes': used,
                'capsules': len(capsules),
                'pinned_capsules': sum(info.pinned for info in capsules),
                'sessions': len(engine.sessions()),
                'max_sessions': config.engine.max_sessions,
                'generations_running': generating,
                'speculative': (f'{config.generation.speculative} '
                                f'(k={config.generation.num_draft_tokens})'),
                'drafted_tokens': engine.speculation_totals['drafted'],
                'accepted_tokens': engine.speculation_totals['accepted'],
            })
            for verb, seconds in sorted(dict(engine.last_latencies).items()):
                values[f'last_{verb}_ms'] = f'{seconds * 1e3:.3f}'
            level = DiagnosticStatus.OK if used < 0.9 * budget else DiagnosticStatus.WARN
            message = (f'{len(capsules)} capsules, {used} of {budget} bytes used, '
                       f'{generating} generating')
            hardware_id = config.backend.device
        status = DiagnosticStatus(
            level=level, name=f'{self.get_fully_qualified_name()}: policy engine',
            hardware_id=hardware_id, message=message,
            values=[KeyValue(key=key, value=str(value)) for key, value in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        with self._publish_lock:
            if self._diagnostics_publisher is not None:
                self._diagnostics_publisher.publish(array)

    # Services: convert, call one engine verb, fill.

    def _serve(self, response, verb):
        """Run ``verb(engine, response)``; map any error onto the response."""
        engine = self._engine
        with self._work_lock:
            closed_reason = '' if self._open else self._closed_reason
        if engine is None or closed_reason:
            response.success = False
            response.error_code = response.NOT_AVAILABLE
            response.message = closed_reason or ENGINE_NOT_AVAILABLE
            return response
        try:
            verb(engine, response)
        except Exception as error:  # every error becomes an answer, never a dead callback
            fill_error(response, error)
            if response.error_code == response.INTERNAL:
                self.get_logger().error(f'internal error: {response.message}')
            return response
        return fill_ok(response)

    def _snapshot_callback(self, request, response):
        def verb(engine, response):
            started = time.perf_counter()
            info = engine.snapshot(
                _require(request.session_id, 'session_id'), request.label, request.pin)
            response.latency_ms = (time.perf_counter() - started) * 1e3
            response.capsule = capsule_message(info)
        return self._serve(response, verb)

    def _restore_callback(self, request, response):
        def verb(engine, response):
            restored = engine.restore(_require(request.capsule_id, 'capsule_id'),
                                      request.session_id)
            response.session_id = restored.session_id
            response.num_tokens = restored.num_tokens
            response.copied_bytes = restored.copied_bytes
            response.latency_ms = restored.latency_s * 1e3
        return self._serve(response, verb)

    def _branch_callback(self, request, response):
        def verb(engine, response):
            started = time.perf_counter()
            response.session_ids = engine.branch(
                _require(request.capsule_id, 'capsule_id'), request.num_branches)
            response.latency_ms = (time.perf_counter() - started) * 1e3
        return self._serve(response, verb)

    def _release_callback(self, request, response):
        def verb(engine, response):
            response.freed_bytes = engine.release(_require(request.capsule_id, 'capsule_id'))
        return self._serve(response, verb)

    def _save_callback(self, request, response):
        def verb(engine, response):
            saved = engine.save(_require(request.capsule_id, 'capsule_id'), request.name)
            response.path = saved.path
            response.bytes_written = saved.bytes_written
            response.latency_ms = saved.latency_s * 1e3
        return self._serve(response, verb)

    def _load_callback(self, request, response):
        def verb(engine, response):
            started = time.perf_counter()
            info = engine.load(_require(request.name, 'name'))
            response.latency_ms = (time.perf_counter() - started) * 1e3
            response.capsule = capsule_message(info)
        return self._serve(response, verb)

    def _close_session_callback(self, request, response):
        def verb(engine, response):
            engine.close_session(_require(request.session_id, 'session_id'))
            response.sessions = engine.sessions()
        return self._serve(response, verb)

    def _list_callback(self, request, response):
        def verb(engine, response):
            response.capsules = [
                capsule_message(info) for info in engine.list_capsules(request.session_id)]
            response.sessions = engine.sessions()
            response.budget_bytes = engine.store.budget_bytes
            response.used_bytes = engine.store.used_bytes
            response.saved = engine.saved_capsules()
        return self._serve(response, verb)

    def _append_callback(self, request, response):
        cancel = threading.Event()  # set when the node stops its work (deactivate, shutdown)

        def verb(engine, response):
            role = role_of(request.role)
            _require(request.prompt, 'prompt')
            started = time.perf_counter()
            self._begin_work('append', cancel)
            try:
                session_id = request.session_id or engine.create_session()
                response.session_id = session_id
                try:
                    response.num_tokens = engine.append(session_id, request.prompt, role=role,
                                                        cancel=cancel)
                except Exception as error:
                    if not request.session_id:
                        engine.close_session(session_id)  # do not leak the slot we opened
                    if isinstance(error, PrefillCanceledError):
                        kept = ('the session it opened is closed' if not request.session_id
                                else f'session {session_id} holds those tokens')
                        raise NotAvailableError(
                            f'append stopped after {error.num_tokens} of {error.total_tokens} '
                            f'tokens ({kept}): {self._stopped_reason()}') from None
                    raise
            finally:
                self._end_work(cancel)
            response.position = engine.session_position(session_id)
            response.latency_ms = (time.perf_counter() - started) * 1e3
        return self._serve(response, verb)

    # Generate action.

    def _generate_goal(self, goal_request):
        """
        Accept every goal; one that cannot run now is aborted with a reason.

        (A rejection would carry no reason to the client.) Accepted goals are waited for by
        deactivate and shutdown from here on.
        """
        with self._work_lock:
            self._goals_accepting.append(time.monotonic())
        return GoalResponse.ACCEPT

    def _generate_accepted(self, goal_handle):
        """Register the goal (stopped at once if the node is closing) and execute it."""
        cancel = GoalCancel(goal_handle)
        with self._work_lock:
            if self._goals_accepting:
                self._goals_accepting.pop(0)
            self._goals[bytes(goal_handle.goal_id.uuid)] = cancel
            self._results_unrequested[bytes(goal_handle.goal_id.uuid)] = None
            if not self._open:
                cancel.stop.set()
        goal_handle.execute()

    def _generate_done(self, goal_id):
        """Forget a goal whose execution ended (b'': a result was sent); wake the drain."""
        with self._work_done:
            if self._goals.pop(goal_id, None) is not None and (
                    goal_id in self._results_unrequested):
                self._results_unrequested[goal_id] = time.monotonic()
            self._forget_unrequested(time.monotonic())
            self._work_done.notify_all()

    def _result_requested(self, goal_id):
        """Record that a client asked for the goal's result (closing waits for the answer)."""
        with self._work_done:
            self._results_unrequested.pop(goal_id, None)
            self._work_done.notify_all()

    def _forget_unrequested(self, now):
        """Stop waiting for result requests of goals that ended long enough ago."""
        self._results_unrequested = {
            goal_id: ended for goal_id, ended in self._results_unrequested.items()
            if ended is None or now - ended < RESULT_REQUEST_GRACE_S}

    def _generate_cancel(self, goal_handle):
        """Accept every cancel request; the goal stops before its next token or prefill chunk."""
        return CancelResponse.ACCEPT

    def _sampling_of(self, sampling):
        """Return the goal's SamplingConfig, or None (session defaults) for a default message."""
        values = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
        if values == (0.0, 0, 1.0, sampling.SEED_UNSET):
            return None  # generation.* parameters
        if not all(math.isfinite(value) for value in values[::2]):
            raise InvalidArgumentError('sampling.temperature and sampling.top_p must be finite')
        return SamplingConfig(
            temperature=float(sampling.temperature), top_k=int(sampling.top_k),
            top_p=float(sampling.top_p), seed=int(sampling.seed))

    def _generate_execute(self, goal_handle):
        """Append the prompt, stream tokens as feedback, honour cancel, snapshot after."""
        with self._work_lock:
            cancel = self._goals.get(bytes(goal_handle.goal_id.uuid))
        if cancel is None:  # not registered by _generate_accepted (cannot happen)
            cancel = GoalCancel(goal_handle)
        result = Generate.Result(session_id=goal_handle.request.session_id,
                                 stop_reason=Generate.Result.STOP_ERROR)
        try:
            self._begin_work('generation')
        except CapsuleRosError as error:
            result = self._failed(fill_error(result, error))
        else:
            try:
                result = self._generate(goal_handle, cancel, result)
            finally:
                self._end_work()
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _generate(self, goal_handle, cancel, result):
        goal = goal_handle.request
        engine = self._engine
        if engine is None:
            result.error_code = result.NOT_AVAILABLE
            result.message = ENGINE_NOT_AVAILABLE
            return result
        created = ''
        generated = []
        try:
            role = role_of(goal.role)
            sampling = self._sampling_of(goal.sampling)
            max_new_tokens = goal.max_new_tokens or self._config.generation.max_new_tokens
            if max_new_tokens > engine.max_seq_len:
                raise InvalidArgumentError(
                    f'max_new_tokens={max_new_tokens} exceeds engine.max_seq_len='
                    f'{engine.max_seq_len}')
            started = time.perf_counter()
            if not goal.session_id:
                created = engine.create_session()
            result.session_id = session_id = goal.session_id or created
            if goal.prompt:
                result.prompt_tokens = engine.append(session_id, goal.prompt, role=role,
                                                     cancel=cancel)
            prefill_s = time.perf_counter() - started

            def on_token(token_id, text_delta):
                generated.append(token_id)
                try:
                    goal_handle.publish_feedback(Generate.Feedback(
                        text_delta=text_delta, token_ids=[token_id],
                        num_generated=len(generated)))
                except RuntimeError as error:  # rclpy's RCLError / InvalidHandle: server gone
                    if not cancel.stop.is_set():
                        self.get_logger().warning(f'generate: feedback not sent ({error}); '
                                                  f'stopping the generation')
                    cancel.stop.set()

            generation = engine.generate(
                session_id, max_new_tokens, sampling, list(goal.stop), on_token=on_token,
                cancel=cancel)
        except PrefillCanceledError as error:
            return self._prefill_canceled(goal_handle, engine, created, result, error)
        except Exception as error:
            if created and not generated:
                self._close_quietly(engine, created)
                result.session_id = ''
            return self._failed(fill_error(result, error))
        result.prompt_tokens += generation.header_tokens  # the template's reply header
        result.text = generation.text
        result.token_ids = list(generation.token_ids)
        result.generated_tokens = len(generation.token_ids)
        result.drafted_tokens = generation.drafted_tokens
        result.accepted_tokens = generation.accepted_tokens
        result.stop_reason = STOP_REASONS[StopReason(generation.stop_reason)]
        if generation.token_ids:
            result.ttft_ms = (prefill_s + generation.first_token_s) * 1e3
        result.tokens_per_second = generation.tokens_per_second
        fill_ok(result)
        if (generation.stop_reason is StopReason.CANCELED
                and not goal_handle.is_cancel_requested):
            result.success = False
            result.error_code = result.NOT_AVAILABLE
            result.message = (f'generation stopped after {result.generated_tokens} tokens: '
                              f'{self._stopped_reason()}')
        if goal.snapshot_after:
            try:
                result.capsule = capsule_message(engine.snapshot(session_id, goal.label,
                                                                 goal.pin))
            except Exception as error:
                fill_error(result, error)
                result.message = (f'generated {result.generated_tokens} tokens, then the '
                                  f'snapshot failed: {result.message}')
        return result

    def _prefill_canceled(self, goal_handle, engine, created, result, error):
        """Fill the result of a goal stopped during its prompt prefill (no token generated)."""
        result.prompt_tokens = error.num_tokens
        result.stop_reason = Generate.Result.STOP_CANCELED
        if created:
            self._close_quietly(engine, created)
            result.session_id = ''
            kept = 'the session it opened is closed'
        else:
            kept = f'session {result.session_id} holds those tokens'
        where = (f'during the prompt prefill, after {error.num_tokens} of '
                 f'{error.total_tokens} prompt tokens ({kept})')
        if goal_handle.is_cancel_requested:
            fill_ok(result)
            result.message = f'canceled {where}'
            return result
        result.success = False
        result.error_code = result.NOT_AVAILABLE
        result.message = f'generation stopped {where}: {self._stopped_reason()}'
        return result

    def _failed(self, result):
        result.stop_reason = Generate.Result.STOP_ERROR
        if result.error_code == result.INTERNAL:
            self.get_logger().error(f'generate: internal error: {result.message}')
        return result

    def _close_quietly(self, engine, session_id):
        try:
            engine.close_session(session_id)
        except Exception as error:  # the goal's own error is what the client must see
            self.get_logger().warning(f'could not close session {session_id}: {error}')


def main(args=None):
    """
    Run the policy node until SIGINT / SIGTERM (entry point of the ``policy_node`` executable).

    rclpy's own signal handling is off: it would shut the context down at once, under the
    generations still running (their feedback and result then fail with RCLError and the
    clients get nothing). Instead a signal asks for the lifecycle shutdown, which runs while
    the executor still spins: running work is stopped and answered, then the interfaces are
    closed, then the executor and the context.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda number, frame: stop.set())
    node = PolicyNode()
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name='policy_node_executor', daemon=True)
    status = 0
    try:
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('autostart: configure failed (see above); exiting')
                status = 1
            elif not stop.is_set():  # a signal during the model load: do not open anything
                node.trigger_activate()
        if status == 0:
            spinner.start()
            while not stop.wait(timeout=0.5):  # wakes for signals (handled in this thread)
                if not spinner.is_alive():
                    node.get_logger().fatal('the executor stopped; exiting')
                    status = 1
                    break
    finally:
        node.shut_down()
        executor.shutdown(timeout_sec=5.0)
        if spinner.is_alive():
            spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == '__main__':
    sys.exit(main())
