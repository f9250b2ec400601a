"""qimg: a pure-Python disk image engine with a qemu-img 7.2 compatible CLI."""

__version__ = "0.1.0"
