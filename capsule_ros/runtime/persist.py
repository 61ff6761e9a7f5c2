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
On-disk capsule format: versioned, checksummed, fingerprinted, atomic, never pickle.

A saved capsule is a directory ``<capsule dir>/<name>/`` holding

- ``payload.safetensors``: the fixed state as ``fixed.<buffer>`` and every segment of the
  chain as ``segment.<index>.<buffer>`` (the whole prefix, ancestors included, so one
  directory restores on its own);
- ``manifest.json``: ``magic``, ``format_version``, the model ``fingerprint``, the capsule's
  identity and lineage (``parent_id``, segment uids shared with relatives), the layout, and
  ``payload_sha256`` / ``payload_bytes`` of the payload file.

Writes go to a hidden staging directory, are fsynced, then renamed into place. Loads verify
names, sizes, magic, version, fingerprint, checksum, and every tensor's dtype and shape
before anything reaches the engine.
"""

from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import time
import uuid

from capsule_ros.runtime.errors import (CapsuleIOError, check_plain_name,
                                        CorruptCapsuleError, FingerprintMismatchError,
                                        InvalidArgumentError, UnknownCapsuleError)
from capsule_ros.runtime.loader import file_sha256
from capsule_ros.runtime.state import StateLayout
import torch


MAGIC = 'capsule_ros/capsule'
FORMAT_VERSION = 1
MANIFEST_NAME = 'manifest.json'
PAYLOAD_NAME = 'payload.safetensors'
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class SavedCapsule:
    """What ``read_capsule`` returns: verified manifest plus tensors."""

    manifest: dict
    fixed: dict[str, torch.Tensor]
    segments: list[tuple[dict, dict[str, torch.Tensor]]]  # (segment manifest, tensors)


def capsule_path(directory: Path, name: str) -> Path:
    """Return the directory of capsule ``name``, checked to lie inside ``directory``."""
    check_plain_name(name, 'capsule name')
    root = directory.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise InvalidArgumentError(f'capsule name {name!r} escapes the capsule directory')
    return path


def write_capsule(directory: Path, name: str, manifest: dict,
                  fixed: dict[str, torch.Tensor],
                  segments: list[tuple[dict, dict[str, torch.Tensor]]]) -> tuple[Path, int]:
    """Write a capsule atomically; returns (path, bytes written)."""
    from safetensors.torch import save_file

    target = capsule_path(directory, name)
    tensors = {f'fixed.{key}': value.contiguous() for key, value in fixed.items()}
    for index, (_, segment_tensors) in enumerate(segments):
        for key, value in segment_tensors.items():
            tensors[f'segment.{index}.{key}'] = value.contiguous()
    staging = target.parent / f'.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        payload = staging / PAYLOAD_NAME
        save_file(tensors, payload, metadata={'format': 'pt', 'magic': MAGIC})
        payload_bytes = payload.stat().st_size
        manifest = dict(manifest, magic=MAGIC, format_version=FORMAT_VERSION,
                        payload_sha256=file_sha256(payload), payload_bytes=payload_bytes,
                        segments=[segment_manifest for segment_manifest, _ in segments],
                        saved_at=time.time())
        manifest_path = staging / MANIFEST_NAME
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for path in (payload, manifest_path, staging):
            _fsync(path)
        retired = None
        if target.exists():
            retired = target.parent / f'.{name}.old-{uuid.uuid4().hex[:8]}'
            os.replace(target, retired)
        os.replace(staging, target)
        _fsync(target.parent)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CapsuleIOError(f'cannot write capsule {name!r} to {directory}: {error}') from error
    return target, payload_bytes + (target / MANIFEST_NAME).stat().st_size


def read_capsule(directory: Path, name: str, layout: StateLayout, fingerprint: str,
                 max_seq_len: int, vocab_size: int, max_payload_bytes: int) -> SavedCapsule:
    """Read and fully verify capsule ``name``; raise a typed error on any defect."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = capsule_path(directory, name)
    manifest_path = path / MANIFEST_NAME
    payload_path = path / PAYLOAD_NAME
    if not manifest_path.is_file():
        raise UnknownCapsuleError(f'no saved capsule {name!r} in {directory} (saved: '
                                  f'{", ".join(list_saved(directory)[:8]) or "none"})')
    try:
        manifest_size = manifest_path.stat().st_size
        if manifest_size > MAX_MANIFEST_BYTES:
            raise CorruptCapsuleError(f'capsule {name!r}: manifest is {manifest_size} bytes, '
                                      f'more than the {MAX_MANIFEST_BYTES} allowed')
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise CorruptCapsuleError(f'capsule {name!r}: manifest is not valid JSON ({error})')
        _check_manifest(name, manifest, fingerprint, max_seq_len)
        if not payload_path.is_file():
            raise CorruptCapsuleError(f'capsule {name!r}: {PAYLOAD_NAME} is missing')
        payload_size = payload_path.stat().st_size
        if payload_size != manifest['payload_bytes']:
            raise CorruptCapsuleError(
                f'capsule {name!r}: payload is {payload_size} bytes, manifest says '
                f'{manifest["payload_bytes"]} (truncated or altered file)')
        if payload_size > max_payload_bytes:
            raise CorruptCapsuleError(
                f'capsule {name!r}: payload of {payload_size} bytes exceeds the '
                f'{max_payload_bytes} bytes a capsule of this engine can have')
        if file_sha256(payload_path) != manifest['payload_sha256']:
            raise CorruptCapsuleError(
                f'capsule {name!r}: payload checksum mismatch (the file was altered or damaged)')
        try:
            tensors = load_file(payload_path)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise CorruptCapsuleError(f'capsule {name!r}: unreadable payload ({error})')
    except OSError as error:
        raise CapsuleIOError(f'cannot read capsule {name!r} from {directory}: {error}')
    fixed = {}
    for spec in layout.fixed_specs:
        fixed[spec.name] = _expect(tensors, f'fixed.{spec.name}', spec.dtype, spec.shape, name)
    segments = []
    for index, segment_manifest in enumerate(manifest['segments']):
        length = segment_manifest['end'] - segment_manifest['start']
        segment_tensors = {}
        for spec in layout.sequence_specs:
            shape = list(spec.shape)
            shape[spec.seq_axis] = length
            segment_tensors[spec.name] = _expect(
                tensors, f'segment.{index}.{spec.name}', spec.dtype, tuple(shape), name)
        segments.append((segment_manifest, segment_tensors))
    expected_keys = {f'fixed.{spec.name}' for spec in layout.fixed_specs} | {
        f'segment.{index}.{spec.name}' for index in range(len(segments))
        for spec in layout.sequence_specs}
    if set(tensors) != expected_keys:
        raise CorruptCapsuleError(f'capsule {name!r}: unexpected tensors '
                                  f'{sorted(set(tensors) ^ expected_keys)[:4]}')
    for _, segment_tensors in segments:
        tokens = segment_tensors.get('tokens')
        if tokens is not None and tokens.numel() and (
                int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise CorruptCapsuleError(f'capsule {name!r}: token ids outside the vocabulary')
    return SavedCapsule(manifest, fixed, segments)


def list_saved(directory: Path) -> list[str]:
    """Names of saved capsules in ``directory`` (those with a manifest)."""
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir()
                  if not entry.name.startswith('.') and (entry / MANIFEST_NAME).is_file())


def _check_manifest(name: str, manifest, fingerprint: str, max_seq_len: int) -> None:
    if not isinstance(manifest, dict) or manifest.get('magic') != MAGIC:
        raise CorruptCapsuleError(f'capsule {name!r}: not a capsule_ros capsule (bad magic)')
    if manifest.get('format_version') != FORMAT_VERSION:
        raise CorruptCapsuleError(
            f'capsule {name!r}: format version {manifest.get("format_version")!r}, this '
            f'build reads version {FORMAT_VERSION}')
    if manifest.get('fingerprint') != fingerprint:
        raise FingerprintMismatchError(
            f'capsule {name!r} was saved by model fingerprint {manifest.get("fingerprint")}, '
            f'this engine is {fingerprint}; load it into the same model, dtype, backend and '
            f'state layout')
    required = {'payload_sha256': str, 'payload_bytes': int, 'position': int,
                'segments': list, 'capsule_id': str, 'parent_id': str, 'label': str,
                'session_id': str, 'created': float}
    for key, kind in required.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptCapsuleError(f'capsule {name!r}: manifest field {key!r} is missing '
                                      f'or not a {kind.__name__}')
    position = manifest['position']
    if position < 0:
        raise CorruptCapsuleError(f'capsule {name!r}: negative position {position}')
    if position > max_seq_len:
        raise InvalidArgumentError(
            f"capsule {name!r} holds {position} tokens, more than this engine's "
            f'engine.max_seq_len={max_seq_len}; load it into a node with longer slots')
    expected_start = 0
    for segment in manifest['segments']:
        if (not isinstance(segment, dict) or not isinstance(segment.get('uid'), str)
                or segment.get('start') != expected_start
                or not isinstance(segment.get('end'), int)
                or not expected_start < segment['end'] <= position):
            raise CorruptCapsuleError(f'capsule {name!r}: segments do not tile [0, {position})')
        expected_start = segment['end']
    if expected_start != position:
        raise CorruptCapsuleError(f'capsule {name!r}: segments do not tile [0, {position})')


def _expect(tensors: dict, key: str, dtype: torch.dtype, shape: tuple, name: str):
    tensor = tensors.get(key)
    if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise CorruptCapsuleError(
            f'capsule {name!r}: tensor {key} is '
            f'{"missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"}, '
            f'expected {dtype} {list(shape)}')
    return tensor


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
