"""Fixtures for the other-format tests; the helpers are in of_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from of_helpers import make_sample


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, qemu_img, qemu_io) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture
def sample(sample_dir):
    """``sample(name) -> (path, format)``, made once per session."""
    def make(name: str) -> tuple[str, str]:
        return make_sample(sample_dir, name)
    return make
