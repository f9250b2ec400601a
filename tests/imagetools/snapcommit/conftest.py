"""Fixtures of the snapshot / commit / rebase / resize / amend / repair tests.

The qimg-vs-qemu-img harness of the command tests (``tests/imagetools/ops/
qimg_harness.py``) is reused: ``tools`` (one scratch directory, qimg run
under the name qemu-img) and ``pair`` (qemu-img in ``ref/``, qimg in
``ours/``). Helpers of this directory live in ``snap_helpers``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_OPS = str(Path(__file__).resolve().parents[1] / "ops")
if _OPS not in sys.path:
    sys.path.insert(0, _OPS)

from qimg_harness import pair, qimg_as_qemu_img, qimg_bin, shared_tools, tools  # noqa: E402,F401
