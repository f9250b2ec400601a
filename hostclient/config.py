"""What the user asked for, parsed once into frozen values.

The command line (hostclient/cli.py) builds these and nothing below it sees
an argparse namespace. Each config checks its own consistency in
``__post_init__`` and raises ConfigError with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hostclient.errors import ConfigError

AGENT_FAILURE_POLICIES = ("fail", "crash-consistent")


@dataclass(frozen=True)
class Timeouts:
    """Seconds. The freeze and thaw bound the time the guest can be frozen."""

    connect: float = 10.0
    ping: float = 5.0
    freeze: float = 30.0
    thaw: float = 10.0
    snapshot: float = 10.0
    commit: float = 3600.0
    qmp: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "ping", "freeze", "thaw", "snapshot", "commit", "qmp"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"the {name} timeout must be a positive number of seconds, "
                                  f"not {value!r}")


@dataclass(frozen=True)
class ImageSpec:
    """An image of a stopped VM and its format (None: guessed from the content)."""

    path: Path
    format: str | None = None


@dataclass(frozen=True)
class BackupConfig:
    """``quiesce backup``: a running VM (qmp set) or stopped images (images set).

    ``images`` holds ImageSpecs; a plain path is taken as an ImageSpec with
    its format to be guessed.
    """

    target_dir: Path
    qmp: str | None = None
    agent: str | None = None
    images: tuple[ImageSpec, ...] = ()
    disks: tuple[str, ...] = ()
    mountpoints: tuple[str, ...] = ()
    compress: bool = False
    on_agent_failure: str = "fail"
    overlay_dir: Path | None = None
    timeouts: Timeouts = Timeouts()
    json: bool = False
    progress: bool | None = None          # None: on a terminal only

    def __post_init__(self) -> None:
        specs = tuple(i if isinstance(i, ImageSpec) else ImageSpec(Path(i)) for i in self.images)
        object.__setattr__(self, "images", specs)
        if self.qmp and self.images:
            raise ConfigError("use either --qmp (running VM) or --image (stopped VM), not both")
        if not self.qmp and not self.images:
            raise ConfigError("say which VM: --qmp QMP_SOCKET [--agent AGENT_SOCKET] for a running "
                              "VM, or --image PATH for a stopped one")
        if self.images and (self.agent or self.disks or self.mountpoints):
            raise ConfigError("--agent, --disk and --mountpoint are for a running VM (--qmp)")
        if self.on_agent_failure not in AGENT_FAILURE_POLICIES:
            raise ConfigError(f"--on-agent-failure must be one of {', '.join(AGENT_FAILURE_POLICIES)}")
        if self.qmp and not self.agent and self.on_agent_failure == "fail":
            raise ConfigError("no --agent given: pass the guest agent socket for a consistent "
                              "backup, or --on-agent-failure crash-consistent to go without")
        paths = [i.path for i in self.images]
        if len(set(paths)) != len(paths):
            raise ConfigError("the same --image is given twice")

    @property
    def running(self) -> bool:
        return self.qmp is not None


@dataclass(frozen=True)
class RestoreConfig:
    backup_dir: Path
    dest_dir: Path
    out_format: str = "qcow2"
    disks: tuple[str, ...] = ()
    force: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.out_format not in ("qcow2", "raw"):
            raise ConfigError(f"-O must be qcow2 or raw, not {self.out_format!r}")


@dataclass(frozen=True)
class VerifyConfig:
    backup_dir: Path
    json: bool = False


@dataclass(frozen=True)
class ListConfig:
    target_dir: Path
    json: bool = False


@dataclass(frozen=True)
class AgentCommandConfig:
    socket: str
    command: str
    arguments: dict | None = None
    timeout: float | None = None
    pretty: bool = False
