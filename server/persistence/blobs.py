"""Durable bytes on the local file system: a content-addressed store plus resumable upload staging.

Layout under ``root``::

    objects/ab/cdef...   content, named by its sha256 hex (the first two digits pick the directory)
    staging/<id>         an upload in progress, appended chunk by chunk

Every write is flushed and fsynced before it is acknowledged, and new objects appear atomically
(temporary file + rename), so a crash never leaves a partial object under a valid key.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from server.domain.errors import ConflictError, CoordinatorError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from server.domain.ports import BlobStore

_KEY = re.compile(r"[0-9a-f]{64}")
# Staging ids are update ids (uuid hex, possibly dashed): nothing that could name another path.
_STAGING_ID = re.compile(r"[0-9A-Fa-f][0-9A-Fa-f-]{7,63}")
_READ_BLOCK = 1024 * 1024
_DISCARDED_REMEMBERED = 16384  # far more uploads than close within one stream's idle timeout


class CorruptBlobError(CoordinatorError):
    """Stored bytes no longer match their checksum (disk or operator damage); retrying will not help."""


class FileBlobStore:
    """Implements ``server.domain.ports.BlobStore`` in a directory; safe to share between threads."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._objects = self._root / "objects"
        self._staging = self._root / "staging"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._staging_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        # Staged uploads discarded lately: a stream still sending to one must not recreate its file (its round
        # closed, or a newer upload replaced it, between the stream's last check and its next chunk).
        self._discarded: OrderedDict[str, None] = OrderedDict()
        # Bytes staged under this root, kept as they change (scanned once here), so admission is O(1).
        self._staged_total = sum(size for _, size, _ in self.staged_uploads())

    # ---- content store ----------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        """Stores ``data`` and returns its key (sha256 hex); storing the same bytes again is a no-op."""
        key = hashlib.sha256(data).hexdigest()
        path = self._object_path(key)
        # An existing object is trusted only if it is intact, so a put also repairs a damaged copy.
        if path.is_file() and _file_sha256(path) == key:
            return key
        path.parent.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return key

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``, verified against it; raises CorruptBlobError on a mismatch."""
        path = self._object_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} not found") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != key:
            raise CorruptBlobError(f"blob {key} is corrupt: its content hashes to {actual} ({path})")
        return data

    def exists(self, key: str) -> bool:
        return self._object_path(key).is_file()

    # ---- staging ----------------------------------------------------------------------------

    def staged_size(self, staging_id: str) -> int:
        """How many bytes of the upload are durably staged (0 if none)."""
        try:
            return self._staged_path(staging_id).stat().st_size
        except FileNotFoundError:
            return 0

    def append_staged(self, staging_id: str, offset: int, data: bytes) -> int:
        """Writes ``data`` at ``offset`` and returns the new staged size once it is on disk.

        ``offset`` must equal the staged size, or be smaller: a client resuming after a write it never
        saw acknowledged resends from its last acknowledged offset, so the unacknowledged tail is cut off.
        """
        path = self._staged_path(staging_id)
        with self._staging_lock(staging_id):
            with self._guard:
                discarded = staging_id in self._discarded
            if discarded:
                raise ConflictError(f"staged upload {staging_id} was closed (its round ended or a newer upload "
                                    "replaced it); take the next task")
            current = self.staged_size(staging_id)
            if offset < 0 or offset > current:
                raise InvalidRequestError(
                    f"staged upload {staging_id}: expected offset {current} (or less, to resume), got {offset}")
            created = not path.exists()
            self._count_staged(offset + len(data) - current)
            with open(path, "r+b" if not created else "wb") as staged:
                if offset < current:
                    staged.truncate(offset)
                staged.seek(offset)
                staged.write(data)
                staged.flush()
                os.fsync(staged.fileno())
            if created:
                _fsync_dir(path.parent)
            return offset + len(data)

    def staged_bytes(self) -> int:
        """Bytes of every upload staged here and not yet promoted or discarded."""
        with self._guard:
            return self._staged_total

    def staged_uploads(self) -> list[tuple[str, int, float]]:
        """(staging id, bytes, seconds since its last write) of every staged upload: for sweeping leftovers."""
        found = []
        now = time.time()
        with os.scandir(self._staging) as entries:
            for entry in entries:
                if _STAGING_ID.fullmatch(entry.name):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue  # promoted or discarded meanwhile
                    found.append((entry.name, stat.st_size, max(0.0, now - stat.st_mtime)))
        return found

    def _count_staged(self, delta: int) -> None:
        with self._guard:
            self._staged_total = max(0, self._staged_total + delta)

    def read_staged(self, staging_id: str) -> bytes:
        try:
            return self._staged_path(staging_id).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"staged upload {staging_id} not found") from None

    def promote_staged(self, staging_id: str, verified_key: str | None = None) -> str:
        """Moves a complete staged upload into the content store; returns its key.

        ``verified_key``: the sha256 the caller has just checked the staged bytes against, which spares
        hashing them a second time (uploads are validated right before they are promoted).
        """
        path = self._staged_path(staging_id)
        with self._staging_lock(staging_id):
            try:
                key = verified_key if verified_key is not None else _file_sha256(path)
                if not path.is_file():
                    raise FileNotFoundError(path)
            except FileNotFoundError:
                raise NotFoundError(f"staged upload {staging_id} not found") from None
            target = self._object_path(key)
            self._count_staged(-path.stat().st_size)
            if target.is_file() and target.stat().st_size == path.stat().st_size and _file_sha256(target) == key:
                path.unlink()
            else:
                target.parent.mkdir(exist_ok=True)
                # The staged file was fsynced on every append; a rename within one file system is atomic.
                os.replace(path, target)
                _fsync_dir(target.parent)
            _fsync_dir(path.parent)
        self._forget_lock(staging_id)
        return key

    def discard_staged(self, staging_id: str) -> None:
        """Deletes a staged upload; discarding one that does not exist is fine."""
        with self._staging_lock(staging_id):
            path = self._staged_path(staging_id)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
            else:
                self._count_staged(-size)
            with self._guard:
                self._discarded[staging_id] = None
                while len(self._discarded) > _DISCARDED_REMEMBERED:
                    self._discarded.popitem(last=False)
        self._forget_lock(staging_id)

    # ---- paths ------------------------------------------------------------------------------

    def _object_path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise InvalidRequestError(f"blob key must be 64 lowercase hex digits, not {key!r}")
        return self._objects / key[:2] / key[2:]

    def _staged_path(self, staging_id: str) -> Path:
        if not _STAGING_ID.fullmatch(staging_id):
            raise InvalidRequestError(f"staging id must be 8-64 hex digits or dashes, not {staging_id!r}")
        return self._staging / staging_id

    def _staging_lock(self, staging_id: str) -> threading.Lock:
        with self._guard:
            return self._staging_locks[staging_id]

    def _forget_lock(self, staging_id: str) -> None:
        with self._guard:
            self._staging_locks.pop(staging_id, None)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # A rename or new file is durable only once its directory entry is; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[BlobStore] = FileBlobStore
