"""Fixtures of the qimg command tests (see qimg_harness for what they do)."""

from qimg_harness import pair, qimg_as_qemu_img, qimg_bin, shared_tools, tools  # noqa: F401
