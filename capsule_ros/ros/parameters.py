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
ROS parameters of the policy node, derived from the runtime's config dataclasses.

The dataclasses in ``capsule_ros.runtime.config`` are the one source of names, types and
defaults: one parameter per field, ``<group>.<field>``, grouped as in ``config/policy.yaml``.
This module adds what only ROS needs: a description, the range tools display (the same
bounds config.py enforces; a unit test holds them together) and the check of a parameter set.

Every group is applied at configure (``on_configure`` reads them into a ``PolicyConfig`` once;
nothing else reads ROS parameters). A set is therefore applied at the next configure or
refused with a reason, never ignored: while the node is configured (inactive or active) every
set is refused ("deactivate, cleanup, set, configure"); in any state a wrong type, a value
out of range or one config.py refuses is refused with its message.
"""

from dataclasses import fields

from capsule_ros.runtime.config import BACKEND_KINDS
from capsule_ros.runtime.config import DTYPES
from capsule_ros.runtime.config import MAX_BUDGET_BYTES
from capsule_ros.runtime.config import MAX_DRAFT_TOKENS
from capsule_ros.runtime.config import PolicyConfig
from capsule_ros.runtime.config import SpeculativeMode
from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.quantization import QUANTIZATION_MODES
from rcl_interfaces.msg import FloatingPointRange
from rcl_interfaces.msg import IntegerRange
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.exceptions import InvalidParameterValueException

# Top-level flag: configure and activate on start-up (what 'ros2 run' users expect). Read once
# by main(), so it is read-only: a later set would change nothing.
AUTOSTART_PARAMETER = 'autostart'

# group -> (name -> default), from a default-constructed PolicyConfig. The default's Python
# type is the parameter's type (declared statically: a set of another type is refused).
_DEFAULT_CONFIG = PolicyConfig()
PARAMETER_DEFAULTS = {
    group.name: {item.name: getattr(getattr(_DEFAULT_CONFIG, group.name), item.name)
                 for item in fields(group.default_factory)}
    for group in fields(PolicyConfig)
}

DESCRIPTIONS = {
    'model.path': "GGUF file or Hugging Face directory; '' = the bundled SmolLM2-135M-Instruct",
    'model.dtype': 'compute dtype',
    'model.cache_dir': "cache of converted weights; '' = ~/.cache/capsule_ros",
    'model.quantization': ('4-bit decode weights: auto (where the weights already are 4-bit, '
                           'bf16 on CPU), int4 (every linear, lossy), none'),
    'backend.kind': 'inference backend',
    'backend.device': 'cpu, cuda or cuda:N',
    'backend.num_threads': "CPU threads of the forward pass; 0 = torch's default",
    'engine.max_seq_len': 'tokens per session slot (preallocated)',
    'engine.max_sessions': 'number of session slots (and of concurrent generations)',
    'engine.prefill_chunk': 'prompt tokens per forward pass during prefill',
    'engine.system_prompt': "system turn prefilled into every new session; '' = none",
    'capsules.budget_bytes': 'capsule storage budget; LRU eviction beyond it (pinned excepted)',
    'capsules.dir': "where save / load keep capsule files; '' = ~/.cache/capsule_ros/capsules",
    'generation.max_new_tokens': 'used when a Generate goal asks for 0',
    'generation.temperature': '0 = greedy',
    'generation.top_k': '0 = off',
    'generation.top_p': 'in (0, 1]; 1.0 = off',
    'generation.seed': '-1 = unset: each session keeps its RNG state',
    'generation.speculative': ('speculative decoding: off, lookup (drafts from n-grams of the '
                               "session's tokens), mtp (the checkpoint's MTP head)"),
    'generation.num_draft_tokens': 'drafts verified per forward pass when speculating',
}
CONFIGURE_TIME = ' (applied at configure)'

# Inclusive bounds advertised in the descriptors; config.py enforces the same (for top_p the
# lower bound 0 itself is excluded: config.py refuses it with a message).
PARAMETER_RANGES = {
    'backend.num_threads': (0, 1024),
    'engine.max_seq_len': (16, 1 << 20),
    'engine.max_sessions': (1, 256),
    'engine.prefill_chunk': (1, 1 << 16),
    'capsules.budget_bytes': (1, MAX_BUDGET_BYTES),
    'generation.max_new_tokens': (1, 1 << 20),
    'generation.temperature': (0.0, 100.0),
    'generation.top_k': (0, 1 << 20),
    'generation.top_p': (0.0, 1.0),
    'generation.seed': (-1, (1 << 63) - 1),
    'generation.num_draft_tokens': (1, MAX_DRAFT_TOKENS),
}
# The largest engine.max_sessions: the executor is sized for it (see node.EXECUTOR_THREADS).
MAX_SESSIONS_LIMIT = PARAMETER_RANGES['engine.max_sessions'][1]

CHOICES = {
    'model.dtype': DTYPES,
    'model.quantization': QUANTIZATION_MODES,
    'backend.kind': BACKEND_KINDS,
    'generation.speculative': tuple(mode.value for mode in SpeculativeMode),
}


def parameter_names():
    """Return every configure-time parameter name, ``<group>.<field>``, in YAML order."""
    return [f'{group}.{name}' for group, defaults in PARAMETER_DEFAULTS.items()
            for name in defaults]


def parameter_descriptor(name):
    """Return the ParameterDescriptor of ``name`` (description, range, choices, read-only)."""
    if name == AUTOSTART_PARAMETER:
        return ParameterDescriptor(
            description='configure and activate on start-up (read at start-up only)',
            read_only=True)
    descriptor = ParameterDescriptor(description=DESCRIPTIONS[name] + CONFIGURE_TIME)
    if name in CHOICES:
        descriptor.additional_constraints = 'one of: ' + ', '.join(CHOICES[name])
    if name in PARAMETER_RANGES:
        low, high = PARAMETER_RANGES[name]
        if isinstance(low, int):
            descriptor.integer_range = [IntegerRange(from_value=low, to_value=high)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high)]
    return descriptor


def declare_parameters(node):
    """
    Declare ``autostart`` and every configure-time parameter on ``node``; return the refusals.

    A start-up value (``-p``, a YAML file) that is refused (wrong type, out of range, refused by
    the node's set check) must not kill the process: the parameter keeps its default and the
    refusal is returned as ``{name: reason}``; the node then fails configure naming it.
    """
    node.declare_parameter(AUTOSTART_PARAMETER, True, parameter_descriptor(AUTOSTART_PARAMETER))
    refused = {}
    for name in parameter_names():
        group, field = name.split('.')
        default = PARAMETER_DEFAULTS[group][field]
        try:
            node.declare_parameter(name, default, parameter_descriptor(name))
        except (InvalidParameterTypeException, InvalidParameterValueException) as error:
            refused[name] = f'parameter {name}: the start-up value was refused: {error}'
            node.declare_parameter(name, default, parameter_descriptor(name),
                                   ignore_override=True)
    return refused


def read_parameters(node):
    """Return the current parameter values as ``{group: {name: value}}``."""
    return {
        group: {
            name: node.get_parameter(f'{group}.{name}').value for name in defaults
        }
        for group, defaults in PARAMETER_DEFAULTS.items()
    }


def set_refusal(name, value, configured_state):
    """
    Return why a set of parameter ``name`` to ``value`` is refused, or '' to accept it.

    ``configured_state`` is the node's lifecycle state while it holds a configuration
    (``'inactive'``, ``'active'``), else ''. Parameters that are not ours are accepted.
    Types and descriptor ranges are checked by rclpy before this; this adds config.py's
    validation (the same message configure would give) and the configure-time rule.
    """
    if name not in DESCRIPTIONS:
        return ''
    if configured_state:
        return (f'{name} is applied at configure and the node is {configured_state}: '
                f'deactivate, cleanup, set {name}, configure (and activate) to change it')
    group, field = name.split('.')
    try:
        PolicyConfig.from_dict({group: {field: value}})
    except InvalidArgumentError as error:
        return str(error)
    return ''


def policy_config(values):
    """
    Build the runtime's ``PolicyConfig`` from ``read_parameters`` output.

    Raises ``InvalidArgumentError`` naming the parameter (``parameter engine.max_seq_len:
    ...``) when a value is out of range or of the wrong type.
    """
    return PolicyConfig.from_dict(values)
