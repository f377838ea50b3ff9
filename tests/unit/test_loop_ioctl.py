"""The loop driver's LOOP_CONFIGURE argument (blockdev.loop_config), against the layout of
<linux/loop.h>: struct loop_config { __u32 fd; __u32 block_size; struct loop_info64 info;
__u64 __reserved[8]; }. A field at the wrong offset would attach the whole file (offset or size
limit ignored) or refuse; the kernel suite attaches real devices with it."""
from __future__ import annotations

import struct

from dmmig.adapters.blockdev import LOOP_CONFIGURE, LOOP_CTL_GET_FREE, loop_config


def test_layout_matches_linux_loop_h() -> None:
    arg = loop_config(7, "/run/dmmig/d.mirror-log", 3 * 4096, 4096)
    assert len(arg) == 8 + 232 + 64  # loop_info64 is 232 bytes
    fd, block_size = struct.unpack_from("=II", arg, 0)
    device, inode, rdevice, offset, sizelimit = struct.unpack_from("=5Q", arg, 8)
    number, encrypt_type, key_size, flags = struct.unpack_from("=4I", arg, 48)
    assert (fd, block_size) == (7, 0)  # 0: the default logical block size (512), as losetup
    assert (device, inode, rdevice, offset, sizelimit) == (0, 0, 0, 3 * 4096, 4096)
    assert (number, encrypt_type, key_size, flags) == (0, 0, 0, 0)  # read-write, no autoclear, no partscan
    assert arg[64:64 + 64].rstrip(b"\0") == b"/run/dmmig/d.mirror-log"
    assert arg[128:304] == bytes(176)  # crypt name, key, init, reserved


def test_a_long_name_is_cut_with_its_terminator_kept() -> None:
    name = "/" + "x" * 100
    arg = loop_config(3, name, 0, 0)
    assert arg[64:64 + 63] == name.encode()[:63] and arg[127] == 0


def test_ioctl_numbers() -> None:
    # _IO(0x4C, 0x82) and _IO(0x4C, 0x0A): no size or direction bits in either
    assert (LOOP_CTL_GET_FREE, LOOP_CONFIGURE) == (0x4C82, 0x4C0A)
