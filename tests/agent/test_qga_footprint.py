"""What the resident agent keeps in memory: modules only a few commands
need are imported when one of them runs, not at start-up.

Every module imported stays resident for the agent's lifetime (CPython
never unloads one), so a heavy import on the start-up path costs memory on
every guest, all the time (docs/qga.md, Performance).
"""

from __future__ import annotations

import subprocess
import sys

#: imported only by the commands or error paths that need them
ON_DEMAND = ("ctypes", "importlib.resources", "tempfile", "shutil", "random",
             "jsonschema", "psutil", "pyudev", "serial")

STARTUP = """
import sys
import agent.cli, agent.daemon
from agent.commands import load_all
from agent.config import Config
from agent.context import Context
from agent.dispatcher import Dispatcher
from agent.platform import Platform
load_all()
dispatcher = Dispatcher(Context(Platform(), config=Config()), blocked=[])
for request in (b'{"execute":"guest-ping"}', b'{"execute":"guest-info"}',
                b'{"execute":"guest-sync","arguments":{"id":1}}'):
    from agent.protocol import Protocol
    (event,) = Protocol().feed(request)
    dispatcher.handle(event)
print(" ".join(sorted(sys.modules)))
"""


def test_start_up_and_plain_requests_leave_heavy_modules_unimported():
    done = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True,
                          timeout=60, check=True)
    loaded = set(done.stdout.split())
    assert "agent.dispatcher" in loaded
    assert sorted(loaded.intersection(ON_DEMAND)) == []
