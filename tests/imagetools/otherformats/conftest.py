"""Fixtures for the other-format tests; the helpers are in of_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from of_helpers import FORMATS, make_sample


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Route -f NAME to our driver modules even before the registry names them."""
    import importlib

    from imagetools import formats
    for name in FORMATS:
        try:
            importlib.import_module(f"imagetools.formats.{name}")
        except ImportError:
            continue
        monkeypatch.setitem(formats._MODULE_OF, name, name)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, qemu_img, qemu_io) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture
def sample(sample_dir):
    """``sample(name) -> (path, format)``, made once per session."""
    def make(name: str) -> tuple[str, str]:
        return make_sample(sample_dir, name)
    return make
