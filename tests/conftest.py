"""Shared fixtures: an isolated tiny-model cache and an offline hub (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports the engine: spawned rank processes inherit the environment.
os.environ["DITSERVE_CACHE"] = tempfile.mkdtemp(prefix="ditserve-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from engine.tiny_models import cached_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir():
    """tiny_dir("flux") -> the cached tiny checkpoint folder, built once per session."""
    return lambda family: cached_tiny_model(f"tiny/{family}")
