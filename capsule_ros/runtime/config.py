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
Frozen, validated configuration objects, built once from ROS parameters or YAML.

The nested groups map one to one onto ``config/policy.yaml``: ``model``, ``backend``,
``engine``, ``capsules``, ``generation``. Every validation error names the parameter.
"""

from dataclasses import dataclass, field, fields
import enum
import math
from pathlib import Path

from capsule_ros.runtime.errors import InvalidArgumentError
from capsule_ros.runtime.quantization import QUANTIZATION_MODES

DTYPES = ('float32', 'bfloat16')
BACKEND_KINDS = ('torch', 'onnxruntime', 'tensorrt')
MAX_BUDGET_BYTES = 1 << 46  # 64 TiB: anything larger is a typo, not a budget
MAX_DRAFT_TOKENS = 16


class SpeculativeMode(str, enum.Enum):
    """Where speculative decoding's drafts come from (``generation.speculative``)."""

    OFF = 'off'
    LOOKUP = 'lookup'  # n-grams of the session's own tokens (no weights)
    MTP = 'mtp'        # the checkpoint's multi-token-prediction head


def _require(condition: bool, parameter: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(f'parameter {parameter}: {message}')


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run; ``path`` empty = the bundled SmolLM2-135M-Instruct GGUF."""

    path: str = ''
    dtype: str = 'bfloat16'
    cache_dir: str = ''
    # auto: decode streams 4-bit weights where they already are 4-bit (GGUF Q4_1), bf16 on
    # CPU; int4: always (lossy for other weights); none: dense weights only
    quantization: str = 'auto'

    def __post_init__(self):
        """Validate."""
        _require(self.dtype in DTYPES, 'model.dtype', f'{self.dtype!r} is not one of {DTYPES}')
        _require(self.quantization in QUANTIZATION_MODES, 'model.quantization',
                 f'{self.quantization!r} is not one of {QUANTIZATION_MODES}')


@dataclass(frozen=True)
class BackendConfig:
    """Where the forward pass runs."""

    kind: str = 'torch'
    device: str = 'cpu'
    num_threads: int = 0  # 0 = torch's default

    def __post_init__(self):
        """Validate."""
        _require(self.kind in BACKEND_KINDS, 'backend.kind',
                 f'{self.kind!r} is not one of {BACKEND_KINDS}')
        _require(self.device == 'cpu' or self.device.startswith('cuda'), 'backend.device',
                 f'{self.device!r} must be "cpu" or "cuda[:N]"')
        _require(0 <= self.num_threads <= 1024, 'backend.num_threads', 'must be in [0, 1024]')


@dataclass(frozen=True)
class EngineConfig:
    """Session slots: how many, how long, and how prompts are cut into chunks."""

    max_seq_len: int = 8192
    max_sessions: int = 4
    prefill_chunk: int = 512
    system_prompt: str = ''

    def __post_init__(self):
        """Validate."""
        _require(16 <= self.max_seq_len <= 1 << 20, 'engine.max_seq_len', 'must be in [16, 2^20]')
        _require(1 <= self.max_sessions <= 256, 'engine.max_sessions', 'must be in [1, 256]')
        _require(1 <= self.prefill_chunk <= 1 << 16, 'engine.prefill_chunk',
                 'must be in [1, 65536]')


@dataclass(frozen=True)
class CapsuleConfig:
    """Capsule storage: the in-memory byte budget and the directory for save/load."""

    budget_bytes: int = 2 << 30
    # saved capsules outlive restarts: not under a cache directory ('' = the cache's capsules/)
    dir: str = '~/.ros/capsule_ros/capsules'  # noqa: A003 (the YAML parameter is capsules.dir)

    def __post_init__(self):
        """Validate."""
        _require(0 < self.budget_bytes <= MAX_BUDGET_BYTES, 'capsules.budget_bytes',
                 f'must be in (0, {MAX_BUDGET_BYTES}]')

    def directory(self) -> Path:
        """Return where capsules are saved (``''``: ``~/.cache/capsule_ros/capsules``)."""
        from capsule_ros.runtime.loader import default_cache_dir
        return Path(self.dir).expanduser() if self.dir else default_cache_dir() / 'capsules'


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding parameters; ``temperature`` 0 is greedy, ``seed`` -1 keeps the session's RNG."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1

    def __post_init__(self):
        """Validate."""
        _require(math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0,
                 'sampling.temperature', f'{self.temperature} must be in [0, 100]')
        _require(0 <= self.top_k <= 1 << 20, 'sampling.top_k', f'{self.top_k} must be >= 0')
        _require(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, 'sampling.top_p',
                 f'{self.top_p} must be in (0, 1]')
        _require(-1 <= self.seed < 1 << 63, 'sampling.seed', f'{self.seed} must be -1 or >= 0')

    @property
    def is_greedy(self) -> bool:
        """Whether decoding takes the argmax (no randomness)."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults for the Generate action."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1
    speculative: str = 'off'  # off | lookup | mtp (SpeculativeMode)
    num_draft_tokens: int = 3  # drafts verified per forward pass when speculating

    def __post_init__(self):
        """Validate."""
        _require(1 <= self.max_new_tokens <= 1 << 20, 'generation.max_new_tokens',
                 'must be in [1, 2^20]')
        modes = tuple(mode.value for mode in SpeculativeMode)
        _require(self.speculative in modes, 'generation.speculative',
                 f'{self.speculative!r} is not one of {modes}')
        _require(1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS, 'generation.num_draft_tokens',
                 f'{self.num_draft_tokens} must be in [1, {MAX_DRAFT_TOKENS}]')
        try:
            self.sampling()
        except InvalidArgumentError as error:
            raise InvalidArgumentError(str(error).replace('sampling.', 'generation.')) from None

    def sampling(self) -> SamplingConfig:
        """Return the default sampling parameters."""
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class PolicyConfig:
    """Everything the policy node needs; one field per YAML group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    capsules: CapsuleConfig = field(default_factory=CapsuleConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    @classmethod
    def from_dict(cls, values: dict) -> 'PolicyConfig':
        """Build from nested groups (``{'model': {'dtype': ...}, ...}``); unknown keys fail."""
        groups = {}
        for group in fields(cls):
            given = dict(values.get(group.name) or {})
            group_type = group.default_factory
            known = {item.name: item.type for item in fields(group_type)}
            unknown = sorted(set(given) - set(known))
            _require(not unknown, f'{group.name}.{unknown[0] if unknown else ""}',
                     f'unknown parameter (known: {", ".join(sorted(known))})')
            for name, value in given.items():
                expected = known[name]
                if expected is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                _require(isinstance(value, expected) and not isinstance(value, bool),
                         f'{group.name}.{name}',
                         f'{value!r} is a {type(value).__name__}, expected {expected.__name__}')
                given[name] = value
            groups[group.name] = group_type(**given)
        unknown_groups = sorted(set(values) - set(groups))
        _require(not unknown_groups, unknown_groups[0] if unknown_groups else '',
                 f'unknown parameter group (known: {", ".join(groups)})')
        return cls(**groups)
