"""Fixtures for the command catalogue tests; the helpers are in qga_helpers.py.

``reference_agent``: the real qemu-ga on a unix socket in a temporary state
directory, with every command that changes the machine blocked (``-b``), so
a test can only ever ask it harmless questions.
"""

from __future__ import annotations

import pytest

import pwd

from qga_helpers import DANGEROUS, start_agent, stop_agent


@pytest.fixture(scope="session")
def reference_agent(qemu_ga, tmp_path_factory):
    """The real qemu-ga, with every machine-changing command blocked."""
    workdir = tmp_path_factory.mktemp("qemu-ga")
    proc, client = start_agent([qemu_ga], workdir)
    client.workdir = workdir
    try:
        yield client
    finally:
        stop_agent(proc, client)


@pytest.fixture(scope="session")
def ssh_reference_agent(qemu_ga, tmp_path_factory):
    """The real qemu-ga with the ssh key commands enabled, for users that do not
    exist: qemu-ga fails before it touches any file for them."""
    try:
        pwd.getpwnam("no-such-user-xyz")
        pytest.skip("this machine has a user no-such-user-xyz")
    except KeyError:
        pass
    workdir = tmp_path_factory.mktemp("qemu-ga-ssh")
    blocked = [name for name in DANGEROUS if not name.startswith("guest-ssh-")]
    proc, client = start_agent([qemu_ga], workdir, blocked=blocked)
    try:
        yield client
    finally:
        stop_agent(proc, client)
