"""``qimg snapshot``: internal snapshots of an image (qemu-img snapshot).

    snapshot [--object objectdef] [--image-opts] [-U] [-q]
             [-l | -a snapshot | -c snapshot | -d snapshot] filename

``-l`` prints the snapshot table as qemu-img does (nothing at all when there
are none). ``-c`` takes a snapshot (name cut to 255 bytes, date now, icount
0), ``-a`` applies one (an ID first, then a name), ``-d`` deletes the first
one with that *name* (qemu-img 7.2 does not match IDs there); the errors are
qemu-img's. As in qemu-img 7.2, there is no ``-f`` and no action at all does
nothing.
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
    if force_share and action != "list":
        raise Reported(f"Could not open '{rest[0]}': force-share=on can only be used with "
                       "read-only images")
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
        elif action is not None:
            change(drv, action, name)
    finally:
        drv.close()
    return 0


def change(drv, action: str, name: str) -> None:
    """-c / -a / -d on an open image, with qemu-img's messages."""
    from imagetools.errors import ImageError, ImageIOError
    if action == "create":
        import os
        import time
        now = time.time_ns() // 1000
        try:
            drv.create_snapshot(os.fsencode(name)[:255].decode("utf-8", "surrogateescape"),
                                date_sec=now // 1_000_000, date_nsec=now % 1_000_000 * 1000,
                                icount=0)
        except ImageIOError as err:
            code = -(err.errno or 5)
            raise Reported(f"Could not create snapshot '{name}': {code} "
                           f"({os.strerror(-code)})") from None
    elif action == "apply":
        if drv.format_name == "raw" and drv.format_probed:
            # qemu-img reopens the raw image while it tries the file layer
            from imagetools.image import PROBED_RAW_WARNING, warn
            warn(PROBED_RAW_WARNING.format(drv.filename))
        try:
            drv.apply_snapshot(name)
        except ImageError as err:
            raise Reported(f"Could not apply snapshot '{name}': {err}") from None
    else:
        match = [sn for sn in drv.snapshots() if sn.name == name]
        if not match:
            raise Reported(f"Could not delete snapshot '{name}': snapshot not found")
        try:
            drv.delete_snapshot(match[0].id, match[0].name)
        except ImageError as err:
            raise Reported(f"Could not delete snapshot '{name}': {err}") from None
