"""Initramfs images: a staging directory packed as a newc cpio archive."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path


def stage_busybox(root: Path, busybox: Path) -> None:
    """A static busybox as /bin/busybox and /bin/sh; init installs the other applet links."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    # the kernel opens /dev/console for init before anything is mounted
    (root / "dev").mkdir(exist_ok=True)
    os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    for d in ("proc", "sys", "run", "tmp"):
        (root / d).mkdir(exist_ok=True)


def stage_modules(root: Path, tree: Path, kver: str, names: list[str]) -> list[str]:
    """Copy the modules `names` and their dependencies into root/modules; return their load
    order (as modprobe would load them), for busybox's insmod."""
    p = subprocess.run(["modprobe", "-a", "--show-depends", "-d", str(tree), "-S", kver, *names],
                       capture_output=True, text=True, check=True)
    order: list[str] = []
    (root / "modules").mkdir(parents=True, exist_ok=True)
    for line in p.stdout.splitlines():
        parts = line.split()
        if parts[:1] != ["insmod"]:
            continue  # "builtin X": nothing to load
        src = Path(parts[1])
        if src.name not in order:
            shutil.copy2(src, root / "modules" / src.name)
            order.append(src.name)
    (root / "modules" / "order").write_text("\n".join(order) + "\n")
    return order


def pack(root: Path, out: Path, *, compress: bool) -> None:
    files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"], cwd=root, input=files,
                          capture_output=True, check=True).stdout
    tmp = out.with_name(out.name + ".tmp")
    if compress:
        tmp.write_bytes(gzip.compress(data, compresslevel=6))
    else:
        tmp.write_bytes(data)
    tmp.rename(out)
