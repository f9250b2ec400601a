"""The distribution itself: it installs into a fresh virtualenv and its CLIs answer."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("qga", "qimg", "quiesce")
MODULES = {"qga": "agent", "qimg": "imagetools", "quiesce": "hostclient"}


def run(*argv: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new virtualenv with the project installed from this checkout (not editable)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    pip = run(str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT),
              timeout=600)
    assert pip.returncode == 0, pip.stderr
    return env_dir


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_help(fresh_venv: Path, script: str) -> None:
    result = run(str(fresh_venv / "bin" / script), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


@pytest.mark.slow
def test_installed_package_has_no_checkout_on_its_path(fresh_venv: Path) -> None:
    # The installed copy must work on its own, not by importing this checkout.
    result = run(str(fresh_venv / "bin" / "python"), "-c",
                 "import agent, imagetools, hostclient; print(agent.__file__)",
                 cwd="/")
    assert result.returncode == 0, result.stderr
    assert str(fresh_venv) in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_module_entry_point_answers_help(script: str) -> None:
    result = run(sys.executable, "-m", MODULES[script], "--help", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_qga_version_flag_names_qemu_ga_version() -> None:
    result = run(sys.executable, "-m", "agent", "-V", cwd=ROOT)
    assert result.returncode == 0
    assert "7.2" in result.stdout


@pytest.mark.parametrize("argv", [("qimg", "--version"), ("quiesce", "--version")])
def test_version_flags(argv: tuple[str, str]) -> None:
    result = run(sys.executable, "-m", MODULES[argv[0]], argv[1], cwd=ROOT)
    assert result.returncode == 0
    assert result.stdout.strip()


def test_readme_states_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
