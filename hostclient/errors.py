"""The host client's error tree.

    HostClientError              root; ``str(err)`` is the one line a user reads
    ├── ConfigError              bad command line or configuration
    ├── GuestAgentError          the guest agent channel
    │   ├── AgentUnavailable     cannot connect, or the channel closed
    │   ├── AgentTimeout         no answer within the command's timeout
    │   ├── AgentProtocolError   the agent answered something unreadable
    │   └── AgentCommandError    the agent answered {"error": {...}}
    ├── QmpError                 the QEMU monitor
    │   ├── QmpUnavailable       cannot connect, or the connection dropped
    │   ├── QmpTimeout           no answer / event within the timeout
    │   ├── QmpCommandError      QEMU answered {"error": {...}}
    │   └── BlockJobError        a block job ended with an error or vanished
    ├── EngineError              the image engine failed (copy, compare, check)
    ├── BackupError              a backup cannot be made, restored or verified
    │   └── VerifyError          a backup's images do not match its manifest
    └── Interrupted              the user pressed Ctrl-C (or sent SIGTERM)

Errors raised by the agent and by QEMU keep the wire ``error_class`` and
``desc`` so callers can record them exactly (the manifest's ``errors``).
"""

from __future__ import annotations


class HostClientError(Exception):
    """Root of the host client's errors."""


class ConfigError(HostClientError):
    pass


class GuestAgentError(HostClientError):
    pass


class AgentUnavailable(GuestAgentError):
    pass


class AgentTimeout(GuestAgentError):
    def __init__(self, command: str, timeout: float, detail: str = "") -> None:
        text = f"guest agent did not answer {command} within {timeout:g} s"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.command = command
        self.timeout = timeout


class AgentProtocolError(GuestAgentError):
    pass


class AgentCommandError(GuestAgentError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpError(HostClientError):
    pass


class QmpUnavailable(QmpError):
    pass


class QmpTimeout(QmpError):
    pass


class QmpCommandError(QmpError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class BlockJobError(QmpError):
    pass


class EngineError(HostClientError):
    pass


class BackupError(HostClientError):
    pass


class VerifyError(BackupError):
    pass


class Interrupted(HostClientError):
    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)
