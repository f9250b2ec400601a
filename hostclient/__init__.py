"""quiesce: the host side — agent client, QMP driver and the backup command."""

__version__ = "0.1.0"
