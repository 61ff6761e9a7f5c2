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
On-disk capsule format: versioned, checksummed, fingerprinted, published atomically, no pickle.

Layout of the capsule directory::

    <name>  ->  .<name>.v-<32 hex>       the name: a symbolic link that save makes and swaps
    .<name>.v-<32 hex>/payload.safetensors  one immutable version of the capsule
    .<name>.v-<32 hex>/manifest.json

- ``payload.safetensors``: the fixed state as ``fixed.<buffer>`` and every segment of the
  chain as ``segment.<index>.<buffer>`` (the whole prefix, ancestors included, so one
  version restores on its own); its safetensors metadata holds ``magic`` and
  ``manifest_sha256``, the digest of the manifest (``manifest_digest``).
- ``manifest.json``: ``magic``, ``format_version``, the model ``fingerprint``, the capsule's
  identity and lineage (``parent_id``, segment uids shared with relatives, the session and
  the identity of its incarnation), the layout, and ``payload_sha256`` / ``payload_bytes``.
  Integrity covers both files: the manifest names the payload's digest, the payload the
  manifest's.

Publishing. A save writes a complete new version directory (files and directory fsynced),
then makes a fresh link to it and renames that link over the name. rename(2) replaces the name
in one step, so a reader, or a crash at any instant, finds the previous version or the new
one: never a mix, never no name. The replaced version is removed afterwards. Why a link and
not a pointer file or a directory swap: the name stays a path to the capsule's files
(``<name>/manifest.json`` works for operators and tools), the swap is one rename of a link
over a link (a directory cannot be renamed over a non-empty directory), and a link made by
save is recognisable: its target is exactly ``.<name>.v-<32 hex>``, a real directory beside
it. Any other link, at any level (name, version, manifest, payload), is refused, and files
are opened relative to the opened directory with ``O_NOFOLLOW``. A name that is a real
directory (copied from another robot, written by hand) loads too; a save replaces it with
``renameat2(RENAME_EXCHANGE)``, atomic as well, and refuses where the system lacks it.

Leftovers. The writer of a version holds an exclusive ``flock`` on its directory from
creation until the name points at it. The kernel drops the lock when the writer dies, even
by SIGKILL, so ``sweep`` removes exactly the versions, links and format-1 staging directories
that no live writer holds and no name points at: it needs no clock and no pid, and is safe
while other processes save into the same directory. The engine sweeps when it saves or lists.

Reading. The payload is read once into memory; its sha256 is checked on those bytes and the
tensors are parsed from them and copied into memory they own, so nothing stays mapped to the
file (rewriting or truncating it later cannot reach the engine). Every manifest field is
validated (names, times, lengths, the segment tiling, the layout), the payload's size must be
exactly what its tensors at the claimed position take (a corrupt length is ``CORRUPT_FILE``;
only a consistent capsule longer than this engine's slots is ``INVALID_ARGUMENT``), and every
tensor's name, dtype and shape is checked before anything reaches the engine.
"""

import ctypes
from dataclasses import dataclass
import errno
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
import re
import shutil
import stat
import time
import uuid
import warnings

from capsule_ros.runtime.errors import (CapsuleIOError, check_plain_name,
                                        CorruptCapsuleError, FingerprintMismatchError,
                                        InvalidArgumentError, PLAIN_NAME, UnknownCapsuleError)
from capsule_ros.runtime.state import StateLayout
import torch


MAGIC = 'capsule_ros/capsule'
FORMAT_VERSION = 2
MANIFEST_NAME = 'manifest.json'
PAYLOAD_NAME = 'payload.safetensors'
MAX_MANIFEST_BYTES = 1 << 20
MAX_POSITION = 1 << 40  # far beyond any slot; real lengths are checked against the payload
MAX_TEXT_CHARS = 4096
# safetensors header: JSON with one entry per tensor (~100 bytes) and the metadata
HEADER_BYTES_BASE = 1 << 16
HEADER_BYTES_PER_TENSOR = 512
VERSION_PATTERN = re.compile(r'\.(?P<name>.+)\.v-[0-9a-f]{32}')
LINK_PATTERN = re.compile(r'\.(?P<name>.+)\.link-[0-9a-f]{32}')
LEGACY_PATTERN = re.compile(r'\.(?P<name>.+)\.(tmp|old)-.+')  # format 1 staging / retired
UID_PATTERN = re.compile(r'[0-9a-f]{32}')
SHA256_PATTERN = re.compile(r'[0-9a-f]{64}')
RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
# every manifest field and its JSON type; no other field is accepted
MANIFEST_FIELDS = {
    'magic': str, 'format_version': int, 'fingerprint': str, 'model': str, 'layout': list,
    'capsule_id': str, 'label': str, 'parent_id': str, 'session_id': str,
    'session_incarnation': str, 'position': int, 'segments': list, 'created': float,
    'saved_at': float, 'payload_sha256': str, 'payload_bytes': int,
}
PAYLOAD_FIELDS = ('payload_sha256', 'payload_bytes')
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class SavedCapsule:
    """What ``read_capsule`` returns: verified manifest plus tensors (in memory they own)."""

    manifest: dict
    fixed: dict[str, torch.Tensor]
    segments: list[tuple[dict, dict[str, torch.Tensor]]]  # (segment manifest, tensors)


class _VersionGone(Exception):
    """The version a name pointed at was replaced while it was being opened: read again."""


def capsule_path(directory: Path, name: str) -> Path:
    """Return the path of capsule ``name`` (the name itself, not the version it points at)."""
    check_plain_name(name, 'capsule name')
    return directory.resolve() / name


def layout_description(layout: StateLayout) -> list[list[str]]:
    """Describe the layout as the manifest records it: [name, kind, dtype] per buffer."""
    return [[spec.name, spec.kind.value, str(spec.dtype)] for spec in layout.specs]


def manifest_digest(manifest: dict) -> str:
    """Sha256 of the manifest's canonical JSON without the payload fields (kept in the payload)."""
    body = {key: value for key, value in manifest.items() if key not in PAYLOAD_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# -- writing --------------------------------------------------------------------------------


def write_capsule(directory: Path, name: str, manifest: dict,
                  fixed: dict[str, torch.Tensor],
                  segments: list[tuple[dict, dict[str, torch.Tensor]]]) -> tuple[Path, int]:
    """
    Write a new version of capsule ``name`` and point the name at it; returns (path, bytes).

    Any OS failure (full disk, file size limit, permissions) is ``CapsuleIOError`` and leaves
    nothing behind: the name keeps its previous version, or stays absent.
    """
    from safetensors.torch import save as serialize

    path = capsule_path(directory, name)
    tensors = {f'fixed.{key}': value.contiguous() for key, value in fixed.items()}
    for index, (_, segment_tensors) in enumerate(segments):
        for key, value in segment_tensors.items():
            tensors[f'segment.{index}.{key}'] = value.contiguous()
    manifest = dict(manifest, magic=MAGIC, format_version=FORMAT_VERSION,
                    segments=[segment_manifest for segment_manifest, _ in segments],
                    saved_at=time.time())
    # serialized in memory and written by us, so every write error is an OSError we see
    payload = serialize(tensors, metadata={'format': 'pt', 'magic': MAGIC,
                                           'manifest_sha256': manifest_digest(manifest)})
    manifest.update(payload_sha256=hashlib.sha256(payload).hexdigest(),
                    payload_bytes=len(payload))
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        root = os.open(directory, DIRECTORY_FLAGS)
    except OSError as error:
        raise CapsuleIOError(f'cannot write capsule {name!r} to {directory}: {error}') from error
    try:
        version, lock = _new_version(root, name)
        published = False
        try:
            _write_file(lock, PAYLOAD_NAME, payload)
            _write_file(lock, MANIFEST_NAME, manifest_bytes)
            os.fsync(lock)
            retired = _publish(root, name, version)
            published = True
            os.fsync(root)
        except BaseException:
            if not published:
                _remove(root, version)
            raise
        finally:
            os.close(lock)  # releases the flock
        if retired:
            _remove(root, retired)
    except OSError as error:
        raise CapsuleIOError(f'cannot write capsule {name!r} to {directory}: {error}') from error
    finally:
        os.close(root)
    return path, len(payload) + len(manifest_bytes)


def _new_version(root: int, name: str) -> tuple[str, int]:
    """Create and lock an empty version directory; returns (its name, its locked fd)."""
    # a sweep (a list or save of another thread or process) may take a version between its
    # mkdir and its flock; on a loaded machine that can happen several times in a row
    for attempt in range(100):
        if attempt:
            time.sleep(0.001 * min(attempt, 20))
        version = f'.{name}.v-{uuid.uuid4().hex}'
        os.mkdir(version, 0o755, dir_fd=root)
        try:
            lock = os.open(version, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=root)
        except FileNotFoundError:
            continue  # swept before we could lock it
        fcntl.flock(lock, fcntl.LOCK_EX)
        # a sweep may have taken the directory between mkdir and flock: then it is gone
        try:
            same = (os.stat(version, dir_fd=root, follow_symlinks=False).st_ino
                    == os.fstat(lock).st_ino)
        except FileNotFoundError:
            same = False
        if same:
            return version, lock
        os.close(lock)
    raise OSError(errno.EAGAIN, 'the capsule directory is being swept by another process; '
                  'retry the save')


def _write_file(folder: int, filename: str, data: bytes) -> None:
    descriptor = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=folder)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _publish(root: int, name: str, version: str) -> str:
    """Point ``name`` at ``version`` in one atomic step; returns what to remove ('' if none)."""
    link = f'.{name}.link-{uuid.uuid4().hex}'
    os.symlink(version, link, dir_fd=root)
    try:
        try:
            current = os.stat(name, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and stat.S_ISDIR(current.st_mode):
            _exchange(root, link, name)
            return link  # now the replaced directory
        retired = ''
        if current is not None and stat.S_ISLNK(current.st_mode):
            target = os.readlink(name, dir_fd=root)
            retired = target if _is_version_of(name, target) else ''
        os.replace(link, name, src_dir_fd=root, dst_dir_fd=root)
        return retired
    except BaseException:
        _remove(root, link)
        raise


def _exchange(root: int, first: str, second: str) -> None:
    """Swap two entries of ``root`` atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, 'renameat2', None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, f'{second!r} is a directory and this system cannot '
                      f'replace it atomically; remove it first')
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(root, os.fsencode(first), root, os.fsencode(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f'{second!r} is a directory and cannot be replaced atomically here '
                      f'({os.strerror(code)}); remove it first')


def _remove(root: int, entry: str) -> None:
    """Remove a directory tree or a file / link of ``root``; whatever is gone stays gone."""
    try:
        info = os.stat(entry, dir_fd=root, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(entry, dir_fd=root, ignore_errors=True)
        else:
            os.unlink(entry, dir_fd=root)
    except OSError:
        pass  # what a failed removal leaves, the next sweep takes


# -- leftovers ------------------------------------------------------------------------------


def sweep(directory: Path) -> list[str]:
    """
    Remove what interrupted saves left behind; returns the entries removed.

    Version directories no name points at and no live writer holds, temporary links, and
    format-1 staging / retired directories. Never raises: what cannot be examined stays.
    """
    try:
        root = os.open(directory, DIRECTORY_FLAGS)
    except OSError:
        return []
    removed = []
    try:
        for entry in os.listdir(root):
            try:
                if _sweep_entry(root, entry):
                    removed.append(entry)
            except OSError:
                continue
    finally:
        os.close(root)
    return removed


def _sweep_entry(root: int, entry: str) -> bool:
    if not entry.startswith('.'):
        return False
    version = VERSION_PATTERN.fullmatch(entry)
    link = LINK_PATTERN.fullmatch(entry)
    if not (version or link or LEGACY_PATTERN.fullmatch(entry)):
        return False
    info = os.stat(entry, dir_fd=root, follow_symlinks=False)
    if stat.S_ISLNK(info.st_mode):
        if not link:
            return False
        target = os.readlink(entry, dir_fd=root)
        if VERSION_PATTERN.fullmatch(target) and _is_locked(root, target):
            return False  # a live save is about to publish it
        os.unlink(entry, dir_fd=root)
        return True
    if not stat.S_ISDIR(info.st_mode):
        return False
    lock = _try_lock(root, entry)
    if lock is None:
        return False  # a live writer holds it
    try:
        if version and _link_target(root, version['name']) == entry:
            return False  # the current version of its name
        shutil.rmtree(entry, dir_fd=root, ignore_errors=True)
        return True
    finally:
        os.close(lock)


def _try_lock(root: int, entry: str) -> int | None:
    try:
        descriptor = os.open(entry, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=root)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _is_locked(root: int, entry: str) -> bool:
    lock = _try_lock(root, entry)
    if lock is None:
        try:
            os.stat(entry, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True
    os.close(lock)
    return False


def _link_target(root: int, name: str) -> str:
    """Where the link ``name`` points ('' when it is not a link)."""
    try:
        return os.readlink(name, dir_fd=root)
    except OSError:
        return ''


def _is_version_of(name: str, target: str) -> bool:
    match = VERSION_PATTERN.fullmatch(target)
    return bool(match) and match['name'] == name


# -- listing --------------------------------------------------------------------------------


def list_saved(directory: Path) -> list[str]:
    """
    Return the names in ``directory`` that could load, sorted.

    Those are plain names whose entry is a directory or a link made by save, holding a
    regular, readable manifest and payload. Skips whatever it cannot examine (unreadable
    entries, FIFOs, foreign links, names that are not plain) instead of failing.
    """
    try:
        root = os.open(directory, DIRECTORY_FLAGS)
    except OSError:
        return []
    try:
        return sorted(entry for entry in os.listdir(root)
                      if not entry.startswith('.') and _is_plain(entry)
                      and _is_complete(root, directory, entry))
    finally:
        os.close(root)


def _is_complete(root: int, directory: Path, name: str) -> bool:
    """Whether ``name`` opens as a capsule with a regular, readable manifest and payload."""
    for _ in range(3):  # a concurrent save may retire the version between two steps
        try:
            folder, entry = _open_capsule(root, directory, name)
        except _VersionGone:
            continue
        except (CorruptCapsuleError, UnknownCapsuleError, OSError):
            return False
        try:
            for filename in (MANIFEST_NAME, PAYLOAD_NAME):
                os.close(_open_regular(folder, filename, name)[0])
            return True
        except FileNotFoundError:
            if entry == name or _link_target(root, name) == entry:
                return False
        except (CorruptCapsuleError, OSError):
            return False
        finally:
            os.close(folder)
    return False


def _is_plain(name: str) -> bool:
    return bool(PLAIN_NAME.fullmatch(name)) and '..' not in name


# -- reading --------------------------------------------------------------------------------


def read_capsule(directory: Path, name: str, layout: StateLayout, fingerprint: str,
                 max_seq_len: int, vocab_size: int) -> SavedCapsule:
    """Read and fully verify capsule ``name``; raise a typed error on any defect."""
    check_plain_name(name, 'capsule name')
    try:
        root = os.open(directory, DIRECTORY_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise UnknownCapsuleError(f'no saved capsule {name!r}: the capsule directory '
                                  f'{directory} does not exist') from None
    except OSError as error:
        raise CapsuleIOError(f'cannot open the capsule directory {directory}: {error}') from None
    try:
        for _ in range(3):
            try:
                return _read_version(root, directory, name, layout, fingerprint, max_seq_len,
                                     vocab_size)
            except _VersionGone:
                continue
            except UnknownCapsuleError as error:
                saved = ', '.join(list_saved(directory)[:8]) or 'none'
                raise UnknownCapsuleError(f'{error} (saved: {saved})') from None
        raise CapsuleIOError(f'capsule {name!r} was replaced three times while being read; '
                             f'retry the load')
    finally:
        os.close(root)


def _open_capsule(root: int, directory: Path, name: str) -> tuple[int, str]:
    """Open the directory holding ``name``'s files; returns (fd, the entry opened)."""
    try:
        info = os.stat(name, dir_fd=root, follow_symlinks=False)
    except FileNotFoundError:
        raise UnknownCapsuleError(f'no saved capsule {name!r} in {directory}') from None
    if stat.S_ISLNK(info.st_mode):
        entry = os.readlink(name, dir_fd=root)
        if not _is_version_of(name, entry):
            raise CorruptCapsuleError(
                f'capsule {name!r} is a symbolic link to {entry!r}; capsule files are never '
                f'read through links (save links a name only to its own .{name}.v-<id>)')
    elif stat.S_ISDIR(info.st_mode):
        entry = name
    else:
        raise CorruptCapsuleError(f'capsule {name!r} in {directory} is not a directory')
    try:
        return os.open(entry, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=root), entry
    except FileNotFoundError:
        if entry != name and _link_target(root, name) != entry:
            raise _VersionGone() from None
        raise CorruptCapsuleError(f'capsule {name!r} points at {entry!r}, which is missing')
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            raise CorruptCapsuleError(f'capsule {name!r}: {entry!r} is not a directory (links '
                                      f'are never followed)') from None
        raise


def _open_regular(folder: int, filename: str, name: str) -> tuple[int, int]:
    """Open a capsule file without following links; returns (fd, size) of a regular file."""
    try:
        descriptor = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, dir_fd=folder)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK):
            raise CorruptCapsuleError(f'capsule {name!r}: {filename} is a symbolic link; '
                                      f'capsule files are never read through links') from None
        raise
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise CorruptCapsuleError(f'capsule {name!r}: {filename} is not a regular file')
    return descriptor, info.st_size


def _read_exactly(descriptor: int, size: int, what: str) -> bytes:
    """Read ``size`` bytes: one read (no copy) below 1 GiB, else chunks joined once."""
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(descriptor, min(remaining, 1 << 30))
        if not chunk:
            raise CorruptCapsuleError(f'{what} ended after {size - remaining} of {size} bytes '
                                      f'(truncated while it was read)')
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b''.join(chunks)


def _read_version(root: int, directory: Path, name: str, layout: StateLayout,
                  fingerprint: str, max_seq_len: int, vocab_size: int) -> SavedCapsule:
    try:
        folder, entry = _open_capsule(root, directory, name)
    except OSError as error:
        raise CapsuleIOError(f'cannot open capsule {name!r} in {directory}: {error}') from None
    try:
        try:
            manifest = _read_manifest(folder, name)
            _check_manifest(name, manifest, fingerprint, layout)
            data = _read_payload(folder, name, manifest, layout, max_seq_len)
        except FileNotFoundError as error:
            if entry != name and _link_target(root, name) != entry:
                raise _VersionGone() from None
            if entry == name and error.filename == MANIFEST_NAME:
                raise UnknownCapsuleError(f'no saved capsule {name!r} in {directory}: its '
                                          f'directory holds no {MANIFEST_NAME}') from None
            raise CorruptCapsuleError(f'capsule {name!r}: {error.filename} is missing') from None
        except OSError as error:
            raise CapsuleIOError(f'cannot read capsule {name!r} from {directory}: '
                                 f'{error}') from None
    finally:
        os.close(folder)
    return _parse_payload(name, manifest, data, layout, vocab_size)


def _read_manifest(folder: int, name: str) -> dict:
    descriptor, size = _open_regular(folder, MANIFEST_NAME, name)
    try:
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCapsuleError(f'capsule {name!r}: manifest is {size} bytes, more than '
                                      f'the {MAX_MANIFEST_BYTES} allowed')
        text = _read_exactly(descriptor, size, f'capsule {name!r}: {MANIFEST_NAME}')
    finally:
        os.close(descriptor)
    try:
        return json.loads(text.decode('utf-8'), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCapsuleError(
            f'capsule {name!r}: manifest is not valid JSON ({error})') from None


def _refuse_constant(constant: str):
    raise ValueError(f'{constant} is not a number a capsule can hold')


def _read_payload(folder: int, name: str, manifest: dict, layout: StateLayout,
                  max_seq_len: int) -> bytes:
    """Check the payload's size against the manifest and the layout, then read it once."""
    descriptor, size = _open_regular(folder, PAYLOAD_NAME, name)
    try:
        if size != manifest['payload_bytes']:
            raise CorruptCapsuleError(
                f'capsule {name!r}: payload is {size} bytes, manifest says '
                f'{manifest["payload_bytes"]} (truncated or altered file)')
        position = manifest['position']
        header_bytes = int.from_bytes(os.pread(descriptor, 8, 0).ljust(8, b'\0'), 'little')
        num_tensors = (len(layout.fixed_specs)
                       + len(manifest['segments']) * len(layout.sequence_specs))
        max_header_bytes = HEADER_BYTES_BASE + HEADER_BYTES_PER_TENSOR * num_tensors
        if (size < 8 or header_bytes > min(max_header_bytes, size - 8)
                or size - 8 - header_bytes != layout.capsule_bytes(position)):
            raise CorruptCapsuleError(
                f'capsule {name!r}: a payload of {size} bytes cannot hold the {position} '
                f'tokens its manifest claims (damaged or forged file)')
        if position > max_seq_len:
            raise InvalidArgumentError(
                f"capsule {name!r} holds {position} tokens, more than this engine's "
                f'engine.max_seq_len={max_seq_len}; load it into a node with longer slots')
        data = _read_exactly(descriptor, size, f'capsule {name!r}: payload')
    finally:
        os.close(descriptor)
    if hashlib.sha256(data).hexdigest() != manifest['payload_sha256']:
        raise CorruptCapsuleError(
            f'capsule {name!r}: payload checksum mismatch (the file was altered or damaged)')
    return data


def _parse_payload(name: str, manifest: dict, data: bytes, layout: StateLayout,
                   vocab_size: int) -> SavedCapsule:
    """Tensors from the verified payload bytes, checked one by one, in memory they own."""
    from safetensors import SafetensorError
    from safetensors.torch import load as deserialize

    header_bytes = int.from_bytes(data[:8], 'little')
    try:
        header = json.loads(data[8:8 + header_bytes].decode('utf-8'),
                            parse_constant=_refuse_constant)
        metadata = header.get('__metadata__') if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCapsuleError(f'capsule {name!r}: unreadable payload header ({error})')
    if (not isinstance(metadata, dict) or metadata.get('magic') != MAGIC
            or metadata.get('manifest_sha256') != manifest_digest(manifest)):
        raise CorruptCapsuleError(
            f'capsule {name!r}: the manifest does not match its payload (one of them was '
            f'altered, or they come from different saves)')
    try:
        with warnings.catch_warnings():
            # the views share the bytes (not writable); each is copied out right below
            warnings.simplefilter('ignore', UserWarning)
            views = deserialize(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise CorruptCapsuleError(f'capsule {name!r}: unreadable payload ({error})') from None
    del data
    tensors = {key: views.pop(key).clone() for key in list(views)}
    fixed = {spec.name: _expect(tensors, f'fixed.{spec.name}', spec.dtype, spec.shape, name)
             for spec in layout.fixed_specs}
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
    logits = fixed.get('last_logits')
    if logits is not None and bool(torch.isnan(logits).any()):
        raise CorruptCapsuleError(f'capsule {name!r}: its last logits are not numbers (NaN)')
    return SavedCapsule(manifest, fixed, segments)


def _check_manifest(name: str, manifest, fingerprint: str, layout: StateLayout) -> None:
    """Validate every field of an untrusted manifest (the payload is checked against it)."""
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

    def corrupt(what: str) -> CorruptCapsuleError:
        return CorruptCapsuleError(f'capsule {name!r}: manifest {what}')

    unknown = sorted(set(manifest) - set(MANIFEST_FIELDS))
    if unknown:
        raise corrupt(f'has fields this format does not define: {unknown[:4]}')
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise corrupt(f'field {key!r} is missing or not a {kind.__name__}')
    if not _is_plain(manifest['capsule_id']):
        raise corrupt(f'capsule_id {manifest["capsule_id"]!r} is not a plain name')
    for key in ('label', 'parent_id', 'session_id'):
        if manifest[key] and not _is_plain(manifest[key]):
            raise corrupt(f'{key} {manifest[key]!r} is not a plain name')
    if manifest['session_incarnation'] and not UID_PATTERN.fullmatch(
            manifest['session_incarnation']):
        raise corrupt('session_incarnation is not a 32-digit hex id')
    for key in ('created', 'saved_at'):
        if not math.isfinite(manifest[key]) or manifest[key] < 0:
            raise corrupt(f'{key} {manifest[key]} is not a time')
    if len(manifest['model']) > MAX_TEXT_CHARS:
        raise corrupt('model name is too long')
    if manifest['layout'] != layout_description(layout):
        raise corrupt('layout differs from the one its fingerprint names')
    if not SHA256_PATTERN.fullmatch(manifest['payload_sha256']):
        raise corrupt('payload_sha256 is not a sha256')
    if manifest['payload_bytes'] < 0:
        raise corrupt('payload_bytes is negative')
    position = manifest['position']
    if not 0 <= position <= MAX_POSITION:
        raise corrupt(f'position {position} is out of range')
    expected_start = 0
    uids = set()
    for segment in manifest['segments']:
        if (not isinstance(segment, dict) or set(segment) != {'uid', 'start', 'end'}
                or not isinstance(segment['uid'], str)
                or not UID_PATTERN.fullmatch(segment['uid']) or segment['uid'] in uids
                or not _is_int(segment['start']) or segment['start'] != expected_start
                or not _is_int(segment['end'])
                or not expected_start < segment['end'] <= position):
            raise corrupt(f'segments do not tile [0, {position}) with distinct ids')
        uids.add(segment['uid'])
        expected_start = segment['end']
    if expected_start != position:
        raise corrupt(f'segments do not tile [0, {position})')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(tensors: dict, key: str, dtype: torch.dtype, shape: tuple, name: str):
    tensor = tensors.get(key)
    if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise CorruptCapsuleError(
            f'capsule {name!r}: tensor {key} is '
            f'{"missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"}, '
            f'expected {dtype} {list(shape)}')
    return tensor
