"""The LUKS header inside an encrypted qcow2 image, for ``qemu-img info``.

qimg cannot decrypt yet (reads and writes of encrypted images fail with a
clear error), but like qemu-img it can describe the encryption: the LUKS1
header the crypto header extension points at gives the cipher, mode, IV
generator, hash, payload offset, master key iterations, UUID and the eight
key slots, in the members of QEMU's QCryptoBlockInfoLUKS.
"""

from __future__ import annotations

import struct

from imagetools.errors import CorruptImageError

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_SECTOR = 512


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def luks_info(raw: bytes) -> dict:
    """QCryptoBlockInfoLUKS members (schema order) from a LUKS1 header."""
    if len(raw) < 592 or raw[:6] != LUKS_MAGIC:
        raise CorruptImageError("Volume is not in LUKS format")
    version = struct.unpack_from(">H", raw, 6)[0]
    if version != 1:
        raise CorruptImageError(f"Unsupported LUKS version {version}")
    cipher_name = _cstr(raw[8:40])
    cipher_mode = _cstr(raw[40:72])
    hash_spec = _cstr(raw[72:104])
    payload_offset, key_bytes = struct.unpack_from(">II", raw, 104)
    mk_iters = struct.unpack_from(">I", raw, 164)[0]
    uuid = _cstr(raw[168:208])
    mode, _, ivgen = cipher_mode.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    bits = key_bytes * 8 // (2 if mode == "xts" else 1)
    out: dict = {"cipher-alg": f"{cipher_name}-{bits}", "cipher-mode": mode,
                 "ivgen-alg": ivgen_alg or "plain"}
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    out["hash-alg"] = hash_spec
    out["payload-offset"] = payload_offset * LUKS_SECTOR
    out["master-key-iters"] = mk_iters
    out["uuid"] = uuid
    slots = []
    for i in range(8):
        active, iters = struct.unpack_from(">II", raw, 208 + 48 * i)
        key_offset, stripes = struct.unpack_from(">II", raw, 208 + 48 * i + 40)
        slot: dict = {"active": active == LUKS_KEY_ENABLED}
        if slot["active"]:
            slot["iters"] = iters
            slot["stripes"] = stripes
        slot["key-offset"] = key_offset * LUKS_SECTOR
        slots.append(slot)
    out["slots"] = slots
    return out
