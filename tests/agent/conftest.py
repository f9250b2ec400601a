"""Fixtures for the qga core tests; the helpers are in qga_harness.py."""

from __future__ import annotations

import pytest

from qga_harness import QGA, AgentProc, spawn_agent


@pytest.fixture
def start_agent(tmp_path, request):
    """start_agent(kind, extra=[...]) for kind in ("qemu-ga", "qga"); all stopped at teardown."""
    started: list[AgentProc] = []

    def start(kind: str, extra: list[str] = (), **kw) -> AgentProc:
        if kind == "qemu-ga":
            # the root conftest's fixture skips, naming the package, when missing
            command = [request.getfixturevalue("qemu_ga")]
        else:
            command = QGA
        agent = spawn_agent(command, tmp_path / f"{kind}-{len(started)}", kind, extra, **kw)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def agents(tmp_path_factory, qemu_ga):
    """(reference, ours): qemu-ga and qga with the same options, both connected.

    Shared by a module's tests: every exchange ends with a resync, so one
    case cannot leak into the next.
    """
    workdir = tmp_path_factory.mktemp("pair")
    ref = spawn_agent([qemu_ga], workdir / "qemu-ga", "qemu-ga")
    try:
        ours = spawn_agent(QGA, workdir / "qga", "qga")
    except BaseException:
        ref.stop()
        raise
    try:
        yield ref.connect(), ours.connect()
    finally:
        ref.stop()
        ours.stop()
