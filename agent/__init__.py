"""qga: a guest agent speaking qemu-ga 7.2's protocol for Linux guests."""

__version__ = "0.1.0"
