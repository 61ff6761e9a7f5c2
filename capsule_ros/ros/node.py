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
"""

import math
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
from capsule_ros.ros.parameters import policy_config
from capsule_ros.ros.parameters import read_parameters
from capsule_ros.runtime.config import SamplingConfig
from capsule_ros.runtime.engine import PolicyEngine
from capsule_ros.runtime.engine import StopReason
from capsule_ros.runtime.errors import InvalidArgumentError
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
import rclpy
from rclpy.action import ActionServer
from rclpy.action import CancelResponse
from rclpy.action import GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile
from rclpy.qos import ReliabilityPolicy

NODE_NAME = 'capsule'
ENGINE_NOT_AVAILABLE = 'engine not available: the node is not configured and active'

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
# How long deactivate / cleanup wait for canceled generations to hand back their threads.
DRAIN_TIMEOUT_S = 30.0
EVENTS_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def _require(value, field):
    """Raise ``InvalidArgumentError`` when a required string field is empty."""
    if not value:
        raise InvalidArgumentError(f'{field} must not be empty')
    return value


class PolicyNode(LifecycleNode):
    """
    Lifecycle node named ``capsule`` that serves capsules of one policy engine.

    on_configure reads the parameters and loads the engine, on_activate opens the services,
    the action and the topics, on_deactivate closes them (canceling generations), on_cleanup
    frees the engine.
    """

    def __init__(self, **kwargs):
        """Declare parameters; no ROS interface is open until the node is activated."""
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        # Attribute names must not shadow rclpy.Node's own (it keeps _parameters and _services).
        self._config = None
        self._engine = None  # the runtime PolicyEngine while configured
        self._mutating_group = MutuallyExclusiveCallbackGroup()
        self._query_group = ReentrantCallbackGroup()
        self._session_work_group = ReentrantCallbackGroup()
        self._events_publisher = None
        self._diagnostics_publisher = None
        self._diagnostics_timer = None
        self._publish_lock = threading.Lock()
        self._capsule_services = []
        self._generate_server = None
        # goal id (bytes) -> cancel event of each running generation.
        self._generations = {}
        self._generations_lock = threading.Lock()
        self._generations_done = threading.Condition(self._generations_lock)

    @property
    def autostart(self):
        """Whether the node configures and activates itself when started."""
        return self.get_parameter(AUTOSTART_PARAMETER).value

    @property
    def executor_threads(self):
        """Executor threads needed: one per session that may generate, plus the reserve."""
        max_sessions = self.get_parameter('engine.max_sessions').value
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool):
            max_sessions = 1  # configure will reject the value and name the parameter
        return min(max(max_sessions, 1), 256) + RESERVED_THREADS

    # Lifecycle transitions.

    def on_configure(self, state):
        """Read the parameters into the runtime's config, load the model, allocate slots."""
        try:
            self._config = policy_config(read_parameters(self))
        except InvalidArgumentError as error:
            self.get_logger().error(f'configure failed: {error}')
            return TransitionCallbackReturn.FAILURE
        try:
            self._engine = PolicyEngine(
                self._config, progress=self.get_logger().info, on_event=self._publish_event)
        except Exception as error:  # any load failure must fail configure, not the process
            self.get_logger().error(
                f'configure failed ({error_code_of(error)}): {type(error).__name__}: {error}')
            self._config = None
            return TransitionCallbackReturn.FAILURE
        self._events_publisher = self.create_lifecycle_publisher(
            CapsuleEvent, '~/events', EVENTS_QOS)
        self._diagnostics_publisher = self.create_lifecycle_publisher(
            DiagnosticArray, '/diagnostics', 10)
        config = self._config
        self.get_logger().info(
            f'configured: {self._engine.model_name} ({config.model.dtype}) on '
            f'{config.backend.kind}/{config.backend.device}, {config.engine.max_sessions} '
            f'sessions x {config.engine.max_seq_len} tokens, fingerprint '
            f'{self._engine.fingerprint}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        """Open the services, the generate action and the diagnostics timer."""
        for name, service_type in MUTATING_SERVICES.items():
            self._capsule_services.append(self.create_service(
                service_type, f'~/{name}', getattr(self, f'_{name}_callback'),
                callback_group=self._mutating_group))
        self._capsule_services.append(self.create_service(
            ListCapsules, '~/list', self._list_callback, callback_group=self._query_group))
        self._capsule_services.append(self.create_service(
            Append, '~/append', self._append_callback,
            callback_group=self._session_work_group))
        self._generate_server = ActionServer(
            self, Generate, '~/generate', self._generate_execute,
            goal_callback=self._generate_goal, cancel_callback=self._generate_cancel,
            callback_group=self._session_work_group)
        self._diagnostics_timer = self.create_timer(
            DIAGNOSTICS_PERIOD_S, self._publish_diagnostics, callback_group=self._query_group)
        result = super().on_activate(state)
        self.get_logger().info('active: services and action open')
        return result

    def on_deactivate(self, state):
        """Cancel running generations, close the interfaces; keep the engine."""
        self._close_interfaces()
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        """Close everything and free the engine (weights, slots, capsules in memory)."""
        self._close_interfaces()
        self._destroy_publishers()
        self._engine = None
        self._config = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        """Close everything on shutdown from any state."""
        self._close_interfaces()
        self._destroy_publishers()
        self._engine = None
        return TransitionCallbackReturn.SUCCESS

    def _close_interfaces(self):
        self.stop_generations()
        if self._diagnostics_timer is not None:
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_timer = None
        for service in self._capsule_services:
            self.destroy_service(service)
        self._capsule_services = []
        if self._generate_server is not None:
            self._generate_server.destroy()
            self._generate_server = None

    def _destroy_publishers(self):
        with self._publish_lock:
            for publisher in (self._events_publisher, self._diagnostics_publisher):
                if publisher is not None:
                    self.destroy_lifecycle_publisher(publisher)
            self._events_publisher = None
            self._diagnostics_publisher = None

    def stop_generations(self):
        """Ask every running generation to stop and wait (bounded) until they have."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with self._generations_done:
            for cancel in self._generations.values():
                cancel.set()
            while self._generations and time.monotonic() < deadline:
                self._generations_done.wait(timeout=deadline - time.monotonic())

    # Topics.

    def _publish_event(self, event):
        """Engine listener: one CapsuleEvent message per capsule event (any thread)."""
        with self._publish_lock:
            publisher = self._events_publisher
            if publisher is None or not publisher.is_activated:
                return
            publisher.publish(event_message(event, self.get_clock().now().to_msg()))

    def _publish_diagnostics(self):
        """Publish one DiagnosticStatus: model, budget, capsules, sessions, latencies."""
        engine = self._engine
        if engine is None:
            return
        capsules = engine.list_capsules()
        budget = engine.store.budget_bytes
        used = engine.store.used_bytes
        with self._generations_lock:
            generating = len(self._generations)
        values = {
            'model': engine.model_name,
            'fingerprint': engine.fingerprint,
            'dtype': self._config.model.dtype,
            'backend': f'{self._config.backend.kind}/{self._config.backend.device}',
            'budget_bytes': budget,
            'used_bytes': used,
            'capsules': len(capsules),
            'pinned_capsules': sum(info.pinned for info in capsules),
            'sessions': len(engine.sessions()),
            'max_sessions': self._config.engine.max_sessions,
            'generations_running': generating,
        }
        for verb, seconds in sorted(dict(engine.last_latencies).items()):
            values[f'last_{verb}_ms'] = f'{seconds * 1e3:.3f}'
        level = DiagnosticStatus.OK if used < 0.9 * budget else DiagnosticStatus.WARN
        status = DiagnosticStatus(
            level=level, name=f'{self.get_fully_qualified_name()}: policy engine',
            hardware_id=self._config.backend.device,
            message=f'{len(capsules)} capsules, {used} of {budget} bytes used, '
                    f'{generating} generating',
            values=[KeyValue(key=key, value=str(value)) for key, value in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        with self._publish_lock:
            publisher = self._diagnostics_publisher
            if publisher is not None and publisher.is_activated:
                publisher.publish(array)

    # Services: convert, call one engine verb, fill.

    def _serve(self, response, verb):
        """Run ``verb(engine, response)``; map any error onto the response."""
        engine = self._engine
        if engine is None:
            response.success = False
            response.error_code = response.NOT_AVAILABLE
            response.message = ENGINE_NOT_AVAILABLE
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
        def verb(engine, response):
            role = role_of(request.role)
            _require(request.prompt, 'prompt')
            started = time.perf_counter()
            session_id = request.session_id or engine.create_session()
            response.session_id = session_id
            try:
                response.num_tokens = engine.append(session_id, request.prompt, role=role)
            except Exception:
                if not request.session_id:
                    engine.close_session(session_id)  # do not leak the slot we opened
                raise
            response.position = engine.session_position(session_id)
            response.latency_ms = (time.perf_counter() - started) * 1e3
        return self._serve(response, verb)

    # Generate action.

    def _generate_goal(self, goal_request):
        """Accept goals while an executor thread is left for the services."""
        with self._generations_lock:
            running = len(self._generations)
        if running >= self.executor_threads - RESERVED_THREADS:
            self.get_logger().warning(
                f'rejecting a generate goal: {running} generations already run '
                f'(engine.max_sessions bounds them)')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _generate_cancel(self, goal_handle):
        """Accept every cancel request; the generation stops before its next token."""
        with self._generations_lock:
            cancel = self._generations.get(bytes(goal_handle.goal_id.uuid))
        if cancel is not None:
            cancel.set()
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
        goal_id = bytes(goal_handle.goal_id.uuid)
        cancel = threading.Event()
        with self._generations_lock:
            self._generations[goal_id] = cancel
        try:
            result = self._generate(goal_handle, cancel)
        finally:
            with self._generations_done:
                del self._generations[goal_id]
                self._generations_done.notify_all()
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _generate(self, goal_handle, cancel):
        goal = goal_handle.request
        result = Generate.Result(session_id=goal.session_id,
                                 stop_reason=Generate.Result.STOP_ERROR)
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
                result.prompt_tokens = engine.append(session_id, goal.prompt, role=role)
            prefill_s = time.perf_counter() - started

            def on_token(token_id, text_delta):
                generated.append(token_id)
                goal_handle.publish_feedback(Generate.Feedback(
                    text_delta=text_delta, token_ids=[token_id],
                    num_generated=len(generated)))
                if goal_handle.is_cancel_requested:
                    cancel.set()

            if goal_handle.is_cancel_requested:
                cancel.set()
            generation = engine.generate(
                session_id, max_new_tokens, sampling, list(goal.stop), on_token=on_token,
                cancel=cancel)
        except Exception as error:
            if created and not generated:
                self._close_quietly(engine, created)
                result.session_id = ''
            return self._failed(fill_error(result, error))
        result.text = generation.text
        result.token_ids = list(generation.token_ids)
        result.generated_tokens = len(generation.token_ids)
        result.stop_reason = STOP_REASONS[StopReason(generation.stop_reason)]
        if generation.token_ids:
            result.ttft_ms = (prefill_s + generation.first_token_s) * 1e3
        result.tokens_per_second = generation.tokens_per_second
        fill_ok(result)
        if (generation.stop_reason is StopReason.CANCELED
                and not goal_handle.is_cancel_requested):
            result.success = False
            result.error_code = result.NOT_AVAILABLE
            result.message = 'generation stopped: the node is deactivating'
        if goal.snapshot_after:
            try:
                result.capsule = capsule_message(engine.snapshot(session_id, goal.label,
                                                                 goal.pin))
            except Exception as error:
                fill_error(result, error)
                result.message = (f'generated {result.generated_tokens} tokens, then the '
                                  f'snapshot failed: {result.message}')
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
    """Run the policy node until shutdown (entry point of the ``policy_node`` executable)."""
    rclpy.init(args=args)
    node = PolicyNode()
    executor = MultiThreadedExecutor(num_threads=node.executor_threads)
    executor.add_node(node)
    try:
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('autostart: configure failed (see above); exiting')
                return 1
            node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop_generations()  # executor threads running a generation must come back
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
