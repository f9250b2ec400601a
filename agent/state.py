"""The state directory (``-t``): what survives an agent restart.

* ``qga.state`` -- qemu-ga's key file ``[global]\\nfd_counter=N\\n``; created
  at start-up when missing (so a bad statedir is found at once), never
  while frozen.  The file commands keep the counter in it.
* ``qga.state.isfrozen`` -- an empty marker that exists exactly while the
  agent believes filesystems are frozen, so an agent restarted in the
  middle of a freeze starts frozen and can still thaw.
"""

from __future__ import annotations

import errno
import logging
import os

from agent.platform import create_temporary

STATE_FILE = "qga.state"
FROZEN_MARKER = "qga.state.isfrozen"

log = logging.getLogger("qga")


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self.state_file = os.path.join(path, STATE_FILE)
        self.frozen_marker = os.path.join(path, FROZEN_MARKER)

    def was_frozen(self) -> bool:
        """True when a previous agent left the frozen marker; OSError if unreadable."""
        try:
            os.stat(self.frozen_marker)
        except FileNotFoundError:
            return False
        return True

    def init_persistent_state(self, frozen: bool) -> bool:
        """Create qga.state with fd_counter=1000 if missing (not while frozen).

        Logs qemu-ga's critical messages and returns False when it cannot.
        """
        try:
            os.stat(self.state_file)
            return True
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.critical("unable to access state file at path %s: %s",
                         self.state_file, os.strerror(exc.errno or errno.EIO))
            return False
        if frozen:
            return True
        try:
            self._write_atomically(self.state_file, b"[global]\nfd_counter=1000\n")
        except OSError as exc:
            log.critical("failed to write persistent state to %s: %s", self.state_file,
                         exc.strerror or exc)
            log.critical("unable to create state file at path %s", self.state_file)
            return False
        return True

    @staticmethod
    def _write_atomically(path: str, data: bytes) -> None:
        try:
            fd, suffix = create_temporary(path, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, f"Failed to create file \u201c{path}.XXXXXX\u201d: "
                                     f"{os.strerror(exc.errno or errno.EIO)}") from None
        tmp = f"{path}.{suffix}"
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise

    def mark_frozen(self) -> None:
        try:
            fd = os.open(self.frozen_marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except OSError:
            log.warning("unable to create %s, fsfreeze may not function properly",
                        self.frozen_marker)

    def clear_frozen(self) -> None:
        try:
            os.unlink(self.frozen_marker)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("unable to delete %s, fsfreeze may not function properly",
                        self.frozen_marker)
