"""The url image store: entries live exactly their TTL, and the oldest go first beyond the bound."""

from __future__ import annotations

import os

import pytest

from server.images import store as image_store
from server.images.store import DirectoryImageStore, ImageStore


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(image_store.time, "monotonic", lambda: now[0])
    return now


def test_an_image_is_served_until_its_ttl_and_never_after(clock):
    store = ImageStore(ttl_s=10.0)
    token = store.put(b"png bytes", "image/png")
    clock[0] += 9.9
    assert store.get(token) == (b"png bytes", "image/png")
    clock[0] += 0.2
    assert store.get(token) is None
    assert store.get("not-a-token") is None


def test_expired_entries_are_dropped_and_the_count_is_bounded(clock):
    store = ImageStore(ttl_s=10.0, max_images=3)
    old = store.put(b"old", "image/png")
    clock[0] += 11
    tokens = [store.put(bytes([i]), "image/webp") for i in range(4)]
    assert store.get(old) is None
    assert store.get(tokens[0]) is None  # beyond max_images: the oldest went first
    assert [store.get(t) for t in tokens[1:]] == [(bytes([i]), "image/webp") for i in (1, 2, 3)]
    assert len({*tokens, old}) == 5 and all(len(t) >= 32 for t in tokens)  # unguessable, never reused


def age(directory, token, seconds):
    path = next(directory.glob(f"{token}.*"))
    modified = path.stat().st_mtime - seconds
    os.utime(path, (modified, modified))


def test_a_directory_store_serves_what_another_server_put_until_its_ttl(tmp_path):
    """Two replicas with the same --image-store-dir answer each other's urls."""
    writer, reader = DirectoryImageStore(tmp_path, ttl_s=10.0), DirectoryImageStore(tmp_path, ttl_s=10.0)
    token = writer.put(b"jpeg bytes", "image/jpeg")
    assert reader.get(token) == (b"jpeg bytes", "image/jpeg")
    age(tmp_path, token, 10.5)
    assert reader.get(token) is None
    assert reader.get("../" + token[3:]) is None and reader.get("x" * 32) is None
    assert not list(tmp_path.glob(".*"))  # no partial file left behind


def test_a_directory_store_drops_expired_files_and_bounds_the_count(tmp_path):
    store = DirectoryImageStore(tmp_path, ttl_s=10.0, max_images=3)
    old = store.put(b"old", "image/png")
    age(tmp_path, old, 11)
    tokens = []
    for i in range(4):
        tokens.append(store.put(bytes([i]), "image/webp"))
        age(tmp_path, tokens[-1], 4 - i)  # distinct ages: oldest first
    assert store.get(old) is None and store.get(tokens[0]) is None
    assert [store.get(t) for t in tokens[1:]] == [(bytes([i]), "image/webp") for i in (1, 2, 3)]
    assert len(list(tmp_path.iterdir())) == 3
