"""Extract the ELF vmlinux from an x86 bzImage.

Xen takes dom0's kernel as a multiboot module; handing it the plain ELF saves Xen the
decompression (~5 s under emulation), and the domU kernel is the same ELF gzipped, the
format libxc's loader decompresses cheaply in dom0."""
from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from pathlib import Path


def vmlinux(bzimage: bytes) -> bytes:
    """The payload of a bzImage (boot protocol >= 2.08: payload_offset/payload_length)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        # the kernel appends the uncompressed size after the xz stream; the decoder stops at the end
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise ValueError(f"unsupported bzImage compression (magic {payload[:6].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise ValueError("bzImage payload is not an ELF image")
    return out


def write_vmlinux(bzimage: Path, out: Path, *, gzipped: bool = False) -> None:
    elf = vmlinux(bzimage.read_bytes())
    tmp = out.with_name(out.name + ".tmp")
    if gzipped:
        with gzip.open(tmp, "wb", compresslevel=6) as f:
            f.write(elf)
    else:
        tmp.write_bytes(elf)
    tmp.rename(out)
