"""``qimg info``: describe an image, or its whole backing chain (qemu-img info).

    info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt]
         [--backing-chain] [-U] filename

The image is opened without its backing chain (so a missing backing file
does not stop plain ``info``); with ``--backing-chain`` each backing file is
opened in turn by its resolved name and recorded format, and a loop is
reported instead of followed. JSON is one ImageInfo object, or an array
of them with ``--backing-chain``.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("format", 1, "f"), ("output", 1, "output"),
        ("backing-chain", 0, "backing-chain"), ("object", 1, "object"),
        ("image-opts", 0, "image-opts"), ("force-share", 0, "U")]


def main(argv: list[str]) -> int:
    fmt = output = None
    chain = image_opts = force_share = False
    scan = Getopt(argv, ":f:hU", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "U":
            force_share = True
        elif opt == "output":
            output = arg
        elif opt == "backing-chain":
            chain = True
        elif opt == "image-opts":
            image_opts = True
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    from imagetools.ops.common import output_format
    mode = output_format(output)
    infos = collect(rest[0], fmt, chain=chain, force_share=force_share, image_opts=image_opts)
    from imagetools.output import human_image_info, to_json
    if mode == "json":
        sys.stdout.write(to_json(infos if chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n".join(human_image_info(info) for info in infos))
    return 0


def collect(filename: str, fmt: str | None = None, *, chain: bool = False,
            force_share: bool = False, image_opts: bool = False) -> list[dict[str, Any]]:
    """ImageInfo dicts for ``filename`` (and its backing files with ``chain``)."""
    from imagetools.ops.common import open_image
    infos = []
    seen: set[str] = set()
    name: str | None = filename
    while name is not None:
        if name in seen:
            raise Reported(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        drv = open_image(name, fmt, read_only=True, force_share=force_share,
                         image_opts=image_opts and name is filename, open_backing=False)
        try:
            info = image_info(drv, drv.filename if image_opts and name is filename else name)
        finally:
            drv.close()
        infos.append(info)
        name = fmt = None
        if chain and "backing-filename" in info:
            name = info["full-backing-filename"]
            fmt = info.get("backing-filename-format")
    return infos


def full_backing_filename(filename: str, backing: str) -> str:
    """The backing name resolved against the directory of ``filename`` as given."""
    if backing.startswith("/") or "/" not in filename:
        return backing
    return filename[:filename.rindex("/") + 1] + backing


def image_info(drv, filename: str) -> dict[str, Any]:
    """One ImageInfo (members inserted in schema order)."""
    info: dict[str, Any] = {"filename": filename, "format": drv.format_name}
    dirty = drv.is_dirty()
    if dirty is not None:               # None: the format has no dirty state to report
        info["dirty-flag"] = bool(dirty)
    actual = allocated_size(drv)
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = drv.size
    cluster = drv.cluster_size
    if cluster:
        info["cluster-size"] = cluster
    if getattr(drv, "encrypted", False):
        info["encrypted"] = True
    backing = drv.backing_filename
    if backing:
        info["backing-filename"] = backing
        info["full-backing-filename"] = full_backing_filename(filename, backing)
        if drv.backing_format:
            info["backing-filename-format"] = drv.backing_format
    snapshots = snapshot_infos(drv)
    if snapshots:
        info["snapshots"] = snapshots
    specific = drv.format_specific()
    if specific:
        info["format-specific"] = specific
    return info


def allocated_size(drv) -> int | None:
    size = drv.allocated_size()
    if size is not None:
        return size
    try:
        return os.stat(drv.filename).st_blocks * 512
    except OSError:
        return None


def snapshot_infos(drv) -> list[dict[str, Any]]:
    """SnapshotInfo dicts of the image's internal snapshots (table order)."""
    listing = getattr(drv, "snapshots", None)
    if listing is None:
        return []
    table = listing() if callable(listing) else listing
    out = []
    for sn in table or ():
        item: dict[str, Any] = {
            "id": str(sn.id),
            "name": sn.name,
            "vm-state-size": sn.vm_state_size,
            "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        }
        icount = getattr(sn, "icount", None)
        if icount is not None:
            item["icount"] = icount
        out.append(item)
    return out
