"""Build the Xen rig's artifacts from Debian's packages, cached by package versions.

    python -m tests.xenrig.build      # builds (or finds) them and prints what took how long

Everything lands in /var/cache/dmmig-xenrig/<key>/ (key = the package versions and the
build inputs in this directory); nothing is installed on this machine:
  xen             the hypervisor, gunzipped (an ELF32 multiboot image QEMU loads as is)
  vmlinux         dom0's kernel, the plain ELF (Xen need not decompress it)
  dom0.cpio       dom0's initramfs, uncompressed: busybox, the 9p/virtio/overlay modules, /init
  tree/           the unpacked packages (xl, xenstored, libxen*, the kernel's modules); dom0
                  puts it over this machine's own root (see dom0-initramfs-init.sh)
  domu-vmlinux.gz the same kernel for the test domU, gzipped (libxc unpacks gzip cheaply)
  domu.cpio.gz    the domU's initramfs: busybox, xen-blkfront, guest-tool, /init
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.xenrig import debs, initramfs
from tests.xenrig.bzimage import write_vmlinux

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("DMMIG_XENRIG_CACHE", "/var/cache/dmmig-xenrig"))
INPUTS = ["build.py", "debs.py", "initramfs.py", "bzimage.py", "dom0-initramfs-init.sh", "domu-init.sh",
          "guest_tool.c"]
# dom0 needs these before its root exists: the 9p transport, 9p itself and overlayfs
DOM0_EARLY_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]


@dataclass
class Artifacts:
    dir: Path
    xen: Path
    dom0_kernel: Path
    dom0_initrd: Path
    domu_kernel: Path
    domu_initrd: Path
    tree: Path
    kver: str
    versions: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


def _artifacts(d: Path, manifest: dict[str, object], timings: dict[str, float]) -> Artifacts:
    return Artifacts(dir=d, xen=d / "xen", dom0_kernel=d / "vmlinux", dom0_initrd=d / "dom0.cpio",
                     domu_kernel=d / "domu-vmlinux.gz", domu_initrd=d / "domu.cpio.gz", tree=d / "tree",
                     kver=str(manifest["kver"]), versions=dict(manifest["versions"]),  # type: ignore[call-overload]
                     timings=timings)


def cache_key(versions: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    for name in INPUTS:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def build() -> Artifacts:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        # one build at a time (two test sessions may start together)
        fcntl.flock(lock, fcntl.LOCK_EX)
        versions = debs.resolve(CACHE)
        timings["resolve"] = time.monotonic() - t0
        d = CACHE / cache_key(versions)
        if (d / "manifest.json").exists():
            timings["total"] = time.monotonic() - t0
            return _artifacts(d, json.loads((d / "manifest.json").read_text()), timings)
        tmp = CACHE / f"{d.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        manifest = _build_into(tmp, versions, timings)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.rename(d)
        _prune(keep=d)
        timings["total"] = time.monotonic() - t0
        return _artifacts(d, manifest, timings)


def _build_into(out: Path, versions: dict[str, str], timings: dict[str, float]) -> dict[str, object]:
    def step(name: str, t: float) -> None:
        timings[name] = time.monotonic() - t

    t = time.monotonic()
    files = debs.download(versions, CACHE / "debs")
    step("download", t)
    t = time.monotonic()
    tree = out / "tree"
    debs.unpack(files, tree)
    kver = _kernel_version(tree)
    # modules.dep is made by the package's postinst, which dpkg -x does not run
    subprocess.run(["depmod", "-b", str(tree), kver], check=True)
    _merge_usr(tree)
    step("unpack", t)

    t = time.monotonic()
    xen_gz = next((tree / "boot").glob("xen-4.17-amd64.gz"))
    with gzip.open(xen_gz) as src, open(out / "xen", "wb") as dst:
        shutil.copyfileobj(src, dst)
    bz = tree / "boot" / f"vmlinuz-{kver}"
    write_vmlinux(bz, out / "vmlinux")
    write_vmlinux(bz, out / "domu-vmlinux.gz", gzipped=True)
    step("kernels", t)

    t = time.monotonic()
    busybox = tree / "usr" / "bin" / "busybox"
    moddir = tree / "usr" / "lib" / "modules" / kver
    stage = out / "stage-dom0"
    initramfs.stage_busybox(stage, busybox)
    initramfs.stage_modules(stage, tree / "usr", kver, DOM0_EARLY_MODULES)
    shutil.copy2(HERE / "dom0-initramfs-init.sh", stage / "init")
    (stage / "init").chmod(0o755)
    initramfs.pack(stage, out / "dom0.cpio", compress=False)
    shutil.rmtree(stage)

    stage = out / "stage-domu"
    initramfs.stage_busybox(stage, busybox)
    (stage / "modules").mkdir()
    shutil.copy2(moddir / "kernel" / "drivers" / "block" / "xen-blkfront.ko", stage / "modules")
    shutil.copy2(HERE / "domu-init.sh", stage / "init")
    (stage / "init").chmod(0o755)
    # static, so the busybox-only initramfs needs no libc
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(stage / "bin" / "guest-tool"),
                    str(HERE / "guest_tool.c")], check=True)
    initramfs.pack(stage, out / "domu.cpio.gz", compress=True)
    shutil.rmtree(stage)
    step("initramfs", t)
    return {"kver": kver, "versions": versions, "build_seconds": dict(timings)}


def _kernel_version(tree: Path) -> str:
    mods = [p.name for p in (tree / "lib" / "modules").iterdir()]
    if len(mods) != 1:
        raise RuntimeError(f"expected one kernel in the unpacked tree, found {mods}")
    return mods[0]


def _merge_usr(tree: Path) -> None:
    """Packages still ship /lib, /bin, /sbin while this machine's root has them as links into
    /usr: a real /lib in an upper overlay layer would hide the host's /lib link (and libc)."""
    for top in ("lib", "lib64", "bin", "sbin"):
        src = tree / top
        if src.is_symlink() or not src.exists():
            continue
        dst = tree / "usr" / top
        dst.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
        shutil.rmtree(src)


def _prune(keep: Path) -> None:
    """Older builds (other package versions or build inputs) are ~400 MB each."""
    for d in CACHE.iterdir():
        if d.is_dir() and d != keep and d.name != "debs":
            shutil.rmtree(d, ignore_errors=True)
    wanted = {debs.deb_name(p, v) for p, v in json.loads((keep / "manifest.json").read_text())["versions"].items()}
    for f in (CACHE / "debs").glob("*.deb"):
        if f.name not in wanted:
            f.unlink()


def main() -> int:
    a = build()
    print(f"artifacts in {a.dir} (kernel {a.kver})")
    for k, v in a.timings.items():
        print(f"  {k:10s} {v:6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
