"""FileBlobStore: content addressing, checksum verification, and the staging rules of resumable uploads."""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path

import pytest

from server.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from server.persistence.blobs import CorruptBlobError, FileBlobStore


@pytest.fixture
def blobs(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.fixture
def staging_id() -> str:
    return uuid.uuid4().hex


def _path_of(root: Path, key: str) -> Path:
    return root / "blobs" / "objects" / key[:2] / key[2:]


def test_put_returns_the_sha256_and_get_returns_the_bytes(blobs: FileBlobStore, tmp_path: Path) -> None:
    key = blobs.put(b"adapter bytes")
    assert key == hashlib.sha256(b"adapter bytes").hexdigest()
    assert blobs.get(key) == b"adapter bytes"
    assert blobs.exists(key)
    assert _path_of(tmp_path, key).is_file()


def test_putting_the_same_bytes_twice_stores_one_object(blobs: FileBlobStore, tmp_path: Path) -> None:
    assert blobs.put(b"same") == blobs.put(b"same")
    assert len([p for p in (tmp_path / "blobs" / "objects").rglob("*") if p.is_file()]) == 1


def test_a_corrupted_object_is_detected_on_read(blobs: FileBlobStore, tmp_path: Path) -> None:
    key = blobs.put(b"original")
    _path_of(tmp_path, key).write_bytes(b"tampered")
    with pytest.raises(CorruptBlobError, match=f"blob {key} is corrupt"):
        blobs.get(key)


def test_putting_the_bytes_again_repairs_a_corrupted_object(blobs: FileBlobStore, tmp_path: Path) -> None:
    key = blobs.put(b"original")
    _path_of(tmp_path, key).write_bytes(b"tampered")
    blobs.put(b"original")
    assert blobs.get(key) == b"original"


def test_an_unknown_key_is_not_found_and_a_malformed_one_is_refused(blobs: FileBlobStore) -> None:
    with pytest.raises(NotFoundError):
        blobs.get("0" * 64)
    assert not blobs.exists("0" * 64)
    with pytest.raises(InvalidRequestError):
        blobs.get("../../etc/passwd")


def test_staged_chunks_append_at_the_current_size(blobs: FileBlobStore, staging_id: str) -> None:
    assert blobs.staged_size(staging_id) == 0
    assert blobs.append_staged(staging_id, 0, b"hello ") == 6
    assert blobs.append_staged(staging_id, 6, b"world") == 11
    assert blobs.staged_size(staging_id) == 11
    assert blobs.read_staged(staging_id) == b"hello world"


def test_a_chunk_beyond_the_staged_size_is_refused_naming_both_offsets(
        blobs: FileBlobStore, staging_id: str) -> None:
    blobs.append_staged(staging_id, 0, b"abc")
    with pytest.raises(InvalidRequestError, match=r"expected offset 3 .*got 5"):
        blobs.append_staged(staging_id, 5, b"xyz")
    with pytest.raises(InvalidRequestError):
        blobs.append_staged(staging_id, -1, b"xyz")
    assert blobs.read_staged(staging_id) == b"abc"


def test_resuming_before_the_staged_size_truncates_the_unacknowledged_tail(
        blobs: FileBlobStore, staging_id: str) -> None:
    blobs.append_staged(staging_id, 0, b"abcdef")
    assert blobs.append_staged(staging_id, 3, b"XY") == 5
    assert blobs.read_staged(staging_id) == b"abcXY"


def test_promoting_a_staged_upload_moves_it_into_the_content_store(blobs: FileBlobStore, staging_id: str) -> None:
    blobs.append_staged(staging_id, 0, b"update payload")
    key = blobs.promote_staged(staging_id)
    assert key == hashlib.sha256(b"update payload").hexdigest()
    assert blobs.get(key) == b"update payload"
    assert blobs.staged_size(staging_id) == 0


def test_promoting_bytes_that_are_already_stored_keeps_one_copy(blobs: FileBlobStore, staging_id: str) -> None:
    key = blobs.put(b"dup")
    blobs.append_staged(staging_id, 0, b"dup")
    assert blobs.promote_staged(staging_id) == key
    assert blobs.get(key) == b"dup"


def test_discarding_removes_staged_bytes_and_tolerates_nothing_staged(blobs: FileBlobStore, staging_id: str) -> None:
    blobs.append_staged(staging_id, 0, b"junk")
    blobs.discard_staged(staging_id)
    blobs.discard_staged(staging_id)
    assert blobs.staged_size(staging_id) == 0
    with pytest.raises(NotFoundError):
        blobs.read_staged(staging_id)
    with pytest.raises(NotFoundError):
        blobs.promote_staged(staging_id)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "abc/def012345", "..", "", "a" * 65, "zzzzzzzz",
                                    "/abs0123456", "0123abcd\x00"])
def test_staging_ids_that_are_not_hex_or_uuid_like_are_refused(blobs: FileBlobStore, bad_id: str) -> None:
    for call in (lambda: blobs.staged_size(bad_id), lambda: blobs.append_staged(bad_id, 0, b"x"),
                 lambda: blobs.read_staged(bad_id), lambda: blobs.promote_staged(bad_id),
                 lambda: blobs.discard_staged(bad_id)):
        with pytest.raises(InvalidRequestError, match="staging id"):
            call()


def test_dashed_uuids_are_valid_staging_ids(blobs: FileBlobStore) -> None:
    staging_id = str(uuid.uuid4())
    assert blobs.append_staged(staging_id, 0, b"x") == 1


def test_concurrent_appends_to_one_upload_never_interleave_bytes(blobs: FileBlobStore, staging_id: str) -> None:
    """Both writers resume from offset 0 (a client retry racing its old stream); one whole chunk wins."""
    barrier = threading.Barrier(2)

    def write(chunk: bytes) -> None:
        barrier.wait()
        blobs.append_staged(staging_id, 0, chunk)

    threads = [threading.Thread(target=write, args=(bytes([c]) * 100_000,)) for c in b"ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert blobs.read_staged(staging_id) in (b"a" * 100_000, b"b" * 100_000)


def test_a_discarded_upload_takes_no_more_chunks(blobs: FileBlobStore, staging_id: str) -> None:
    # A stream still sending when its round closed (or a newer upload replaced it) must not recreate the
    # file its expiry just deleted, not even from offset 0.
    blobs.append_staged(staging_id, 0, b"abcd")
    blobs.discard_staged(staging_id)
    with pytest.raises(ConflictError, match="was closed"):
        blobs.append_staged(staging_id, 0, b"abcd")
    assert blobs.staged_size(staging_id) == 0 and blobs.staged_bytes() == 0
    other = uuid.uuid4().hex
    blobs.discard_staged(other)  # discarded before its first chunk: the race the tombstone closes
    with pytest.raises(ConflictError):
        blobs.append_staged(other, 0, b"x")
    assert blobs.staged_bytes() == 0
