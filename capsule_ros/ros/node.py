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
The policy node: capsule services, the generate action and the events topic.

Callbacks stay short: convert the request, call one engine verb, fill the response. Until the
engine lands, verbs that need it answer ``NOT_AVAILABLE`` and ``list`` answers an empty list.
"""

import sys

from capsule_ros.action import Generate
from capsule_ros.msg import CapsuleEvent
from capsule_ros.ros.parameters import AUTOSTART_PARAMETER
from capsule_ros.ros.parameters import declare_parameters
from capsule_ros.ros.parameters import read_parameters
from capsule_ros.srv import Branch
from capsule_ros.srv import ListCapsules
from capsule_ros.srv import LoadCapsule
from capsule_ros.srv import ReleaseCapsule
from capsule_ros.srv import Restore
from capsule_ros.srv import SaveCapsule
from capsule_ros.srv import Snapshot
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

NODE_NAME = 'capsule'
ENGINE_NOT_AVAILABLE = 'engine not available yet'

# Service name (under the node's private namespace '~/') -> service type. All of them mutate
# engine state except 'list'.
MUTATING_SERVICES = {
    'snapshot': Snapshot,
    'restore': Restore,
    'branch': Branch,
    'release': ReleaseCapsule,
    'save': SaveCapsule,
    'load': LoadCapsule,
}


class PolicyNode(LifecycleNode):
    """
    Lifecycle node named ``capsule`` that serves capsules of one policy engine.

    on_configure reads parameters, on_activate opens the services and the action,
    on_deactivate closes them, on_cleanup drops the configuration.
    """

    def __init__(self, **kwargs):
        """Declare parameters; no ROS interface is open until the node is activated."""
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        # Attribute names must not shadow rclpy.Node's own (it keeps _parameters and _services).
        self._config = None
        self._engine = None  # the runtime PolicyEngine, once it exists
        # Mutating verbs run one at a time; read-only queries may run alongside them.
        self._mutating_group = MutuallyExclusiveCallbackGroup()
        self._query_group = ReentrantCallbackGroup()
        self._events_publisher = None
        self._capsule_services = []
        self._generate_server = None

    @property
    def autostart(self):
        """Whether the node configures and activates itself when started."""
        return self.get_parameter(AUTOSTART_PARAMETER).value

    # Lifecycle transitions.

    def on_configure(self, state):
        """Read the parameters and create the (inactive) events publisher."""
        self._config = read_parameters(self)
        self._events_publisher = self.create_lifecycle_publisher(CapsuleEvent, '~/events', 10)
        self.get_logger().info(
            f"configured: backend {self._config['backend']['kind']} on "
            f"{self._config['backend']['device']}; {ENGINE_NOT_AVAILABLE}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        """Open the services and the generate action, activate the events publisher."""
        for name, service_type in MUTATING_SERVICES.items():
            self._capsule_services.append(self.create_service(
                service_type, f'~/{name}', self._answer_not_available,
                callback_group=self._mutating_group))
        self._capsule_services.append(self.create_service(
            ListCapsules, '~/list', self._list_callback, callback_group=self._query_group))
        self._generate_server = ActionServer(
            self, Generate, '~/generate', self._generate_execute,
            goal_callback=self._generate_goal, cancel_callback=self._generate_cancel,
            callback_group=self._mutating_group)
        self.get_logger().info('active: services and action open')
        return super().on_activate(state)

    def on_deactivate(self, state):
        """Close the services and the action; keep the configuration."""
        self._close_interfaces()
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        """Drop the configuration and the events publisher."""
        self._close_interfaces()
        if self._events_publisher is not None:
            self.destroy_lifecycle_publisher(self._events_publisher)
            self._events_publisher = None
        self._config = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        """Close everything on shutdown from any state."""
        self._close_interfaces()
        return TransitionCallbackReturn.SUCCESS

    def _close_interfaces(self):
        for service in self._capsule_services:
            self.destroy_service(service)
        self._capsule_services = []
        if self._generate_server is not None:
            self._generate_server.destroy()
            self._generate_server = None

    # Services.

    def _answer_not_available(self, request, response):
        """Answer a request that needs the engine while there is none."""
        response.success = False
        response.error_code = response.NOT_AVAILABLE
        response.message = ENGINE_NOT_AVAILABLE
        return response

    def _list_callback(self, request, response):
        """List capsules and sessions: none while there is no engine."""
        response.success = True
        response.error_code = response.OK
        response.budget_bytes = self._config['capsules']['budget_bytes']
        response.used_bytes = 0
        return response

    # Generate action.

    def _generate_goal(self, goal_request):
        """Accept every goal; the execute callback reports why it cannot run."""
        return GoalResponse.ACCEPT

    def _generate_cancel(self, goal_handle):
        """Allow every cancel request."""
        return CancelResponse.ACCEPT

    def _generate_execute(self, goal_handle):
        """Abort with NOT_AVAILABLE until the engine lands."""
        result = Generate.Result()
        result.success = False
        result.error_code = Generate.Result.NOT_AVAILABLE
        result.message = ENGINE_NOT_AVAILABLE
        result.session_id = goal_handle.request.session_id
        result.stop_reason = Generate.Result.STOP_ERROR
        goal_handle.abort()
        return result


def main(args=None):
    """Run the policy node until shutdown (entry point of the ``policy_node`` executable)."""
    rclpy.init(args=args)
    node = PolicyNode()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        if node.autostart:
            node.trigger_configure()
            node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
