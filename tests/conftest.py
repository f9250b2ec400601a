"""Shared fixtures: where the oracles are, and stated skips for what is missing.

Markers (see pyproject.toml): ``root``, ``oracle``, ``qemu``, ``slow``.
A test marked ``root`` skips when not running as root; the oracle fixtures
below skip, naming the Debian package, when a QEMU tool is missing. Every
skip carries its reason, and pytest's ``-ra`` prints them all at the end.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest


def pytest_configure(config):
    """Default dispositions for SIGINT and SIGHUP, whatever started pytest.

    A run started in the background (``cmd &`` in a script, nohup) inherits
    them ignored, and so would every agent, qemu-ga and quiesce process the
    tests start: the tests of signal handling would then test the launcher.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


ORACLES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-ga": "qemu-guest-agent",
    "qemu-system-x86_64": "qemu-system-x86",
}


def find_tool(name: str) -> str:
    """The path of a QEMU tool, or skip the test saying which package has it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        package = ORACLES.get(name, name)
        pytest.skip(f"{name} not installed (Debian package {package}; `make test` as root installs it)")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts or FIFREEZE)")


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return find_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return find_tool("qemu-io")


@pytest.fixture(scope="session")
def qemu_ga() -> str:
    return find_tool("qemu-ga")


@pytest.fixture(scope="session")
def qemu_system() -> str:
    return find_tool("qemu-system-x86_64")
