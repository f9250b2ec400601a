"""Temporary files beside a target (g_mkstemp's ``NAME.XXXXXX``), shared by
the atomic replace of guest files and the state file."""

from __future__ import annotations

import errno
import os
import re

import pytest

from agent import platform as platform_module
from agent.platform import Platform, ReplaceError, create_temporary
from agent.state import StateDir


def test_replace_file_writes_atomically_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "keys"
    target.write_bytes(b"old")
    Platform().replace_file(str(target), b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["keys"]


def test_replace_file_names_the_temporary_it_could_not_create(tmp_path):
    missing = tmp_path / "no-such-dir" / "keys"
    with pytest.raises(ReplaceError) as caught:
        Platform().replace_file(str(missing), b"x")
    assert caught.value.step == "create" and caught.value.errno == errno.ENOENT
    assert re.fullmatch(re.escape(str(missing)) + r"\.[A-Z0-9]{6}", caught.value.tmp)


def test_replace_file_under_a_root_names_guest_paths(tmp_path):
    (tmp_path / "home").mkdir()
    Platform(root=str(tmp_path)).replace_file("/home/keys", b"k")
    assert (tmp_path / "home" / "keys").read_bytes() == b"k"
    with pytest.raises(ReplaceError) as caught:
        Platform(root=str(tmp_path)).replace_file("/nohome/keys", b"k")
    assert re.fullmatch(r"/nohome/keys\.[A-Z0-9]{6}", caught.value.tmp)


def test_create_temporary_retries_taken_names_then_gives_up(tmp_path, monkeypatch):
    monkeypatch.setattr(platform_module.os, "urandom", lambda n: bytes(n))   # always "AAAAAA"
    fd, suffix = create_temporary(str(tmp_path / "f"), 0o600)
    os.close(fd)
    assert suffix == "AAAAAA" and (tmp_path / "f.AAAAAA").stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError) as caught:
        create_temporary(str(tmp_path / "f"), 0o600)
    assert caught.value.errno == errno.EEXIST and caught.value.filename == "AAAAAA"


def test_state_file_write_failure_is_worded_as_glib(tmp_path):
    missing = tmp_path / "gone" / "qga.state"
    with pytest.raises(OSError) as caught:
        StateDir._write_atomically(str(missing), b"[global]\n")
    assert str(caught.value.strerror) == \
        f"Failed to create file \u201c{missing}.XXXXXX\u201d: No such file or directory"
