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
Launch the capsule_ros policy node as a managed (lifecycle) node.

ros2 launch capsule_ros policy.launch.py [params_file:=...] [namespace:=...]
    [model_path:=...] [backend:=torch|onnxruntime|tensorrt] [autostart:=true|false]

With autostart (the default) the launch system configures the node as soon as it starts and
activates it once it is inactive, through the node's lifecycle services.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.actions import EmitEvent
from launch.actions import RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition


def generate_launch_description():
    """Return the launch description: arguments, the lifecycle node, autostart handlers."""
    autostart = LaunchConfiguration('autostart')
    arguments = [
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution(
                [FindPackageShare('capsule_ros'), 'config', 'policy.yaml']),
            description='parameters YAML of the policy node'),
        DeclareLaunchArgument(
            'namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument(
            'model_path', default_value='',
            description="model file; '' = the bundled SmolLM2-135M-Instruct"),
        DeclareLaunchArgument(
            # the kinds backend.kind accepts (capsule_ros/runtime/config.py BACKEND_KINDS)
            'backend', default_value='torch', choices=['torch', 'onnxruntime', 'tensorrt'],
            description='inference backend'),
        DeclareLaunchArgument(
            'autostart', default_value='true',
            description='configure and activate the node once it is up'),
    ]
    policy_node = LifecycleNode(
        package='capsule_ros',
        executable='policy_node',
        name='capsule',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        parameters=[
            LaunchConfiguration('params_file'),
            {
                'model.path': ParameterValue(LaunchConfiguration('model_path'), value_type=str),
                'backend.kind': ParameterValue(LaunchConfiguration('backend'), value_type=str),
                # The launch system drives the transitions below, not the node itself.
                'autostart': False,
            },
        ],
    )
    configure = EmitEvent(
        event=ChangeState(
            lifecycle_node_matcher=matches_action(policy_node),
            transition_id=Transition.TRANSITION_CONFIGURE),
        condition=IfCondition(autostart))
    activate_when_inactive = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=policy_node,
            start_state='configuring',
            goal_state='inactive',
            entities=[EmitEvent(event=ChangeState(
                lifecycle_node_matcher=matches_action(policy_node),
                transition_id=Transition.TRANSITION_ACTIVATE))]),
        condition=IfCondition(autostart))
    return LaunchDescription(arguments + [activate_when_inactive, policy_node, configure])
