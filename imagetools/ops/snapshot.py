"""``qimg snapshot``: internal snapshots of an image (qemu-img snapshot).

    snapshot [--object objectdef] [--image-opts] [-U] [-q]
             [-l | -a snapshot | -c snapshot | -d snapshot] filename

``-l`` prints the snapshot table as qemu-img does (nothing at all when there
are none). Creating, applying and deleting snapshots (``-c``, ``-a``,
``-d``) are not implemented yet: they say so and exit 1. As in qemu-img
7.2, there is no ``-f`` and no action at all does nothing.
"""

from __future__ import annotations

import sys

from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U")]

ACTIONS = {"l": "list", "a": "apply", "c": "create", "d": "delete"}


def main(argv: list[str]) -> int:
    action = name = None
    force_share = image_opts = False
    scan = Getopt(argv, ":la:c:d:hqU", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt in ACTIONS:
            if action is not None:
                raise usage_error("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = ACTIONS[opt], arg
        elif opt == "U":
            force_share = True
        elif opt == "image-opts":
            image_opts = True
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    if action in ("apply", "create", "delete"):
        raise Reported(f"snapshot -{action[0]} is not implemented yet")
    from imagetools.ops.common import open_image
    # qemu-img opens read-write unless listing (so a probed raw image warns)
    drv = open_image(rest[0], None, read_only=action == "list", force_share=force_share,
                     image_opts=image_opts)
    try:
        if action == "list":
            from imagetools.ops.info import snapshot_infos
            table = snapshot_infos(drv)
            if table:
                from imagetools.output import snapshot_table
                sys.stdout.write(snapshot_table(table))
    finally:
        drv.close()
    return 0
