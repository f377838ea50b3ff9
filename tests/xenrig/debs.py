"""Debian packages for the Xen rig: resolve candidate versions, download with `apt-get download`
(pinned to those versions) and unpack with `dpkg -x`, so nothing is installed on this machine."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

# the Xen family is taken whole from the archive (with its dependency closure inside the family);
# everything else xl and friends link against (libc, ncurses, python3) comes from this machine
XEN_ROOTS = ["xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils"]
FAMILY = re.compile(r"^(lib)?xen|^libyajl")
# the dom0 kernel: the generic flavour (cloud lacks CONFIG_XEN_DOM0); busybox for both initramfs
KERNEL_META = "linux-image-amd64"
EXTRA = ["busybox-static"]
LISTS = Path("/var/lib/apt/lists")


class DebError(RuntimeError):
    pass


def _out(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise DebError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}"
                       "\n(apt lists missing? run `apt-get update` or the README's install command)")
    return p.stdout


def show(pkgs: list[str]) -> dict[str, dict[str, str]]:
    """Candidate Version and Depends of real packages, in one apt-cache call (each call costs
    ~1.3 s of cache loading here)."""
    text = _out(["apt-cache", "show", "--no-all-versions", *pkgs])
    info: dict[str, dict[str, str]] = {}
    for para in text.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Depends): (.*)$", para, re.M))
        if "Package" in fields:
            info[fields["Package"]] = fields
    absent = [p for p in pkgs if p not in info or "Version" not in info[p]]
    if absent:
        raise DebError(f"apt-cache knows no candidate for {absent}")
    return info


def kernel_package() -> str:
    """linux-image-amd64 depends on exactly one versioned image package: that one."""
    deps = show([KERNEL_META])[KERNEL_META].get("Depends", "")
    names = [d.split()[0] for d in deps.split(",") if d.strip().startswith("linux-image-")]
    if len(names) != 1:
        raise DebError(f"cannot tell the kernel package from {KERNEL_META} Depends: {deps}")
    return names[0]


def xen_closure() -> list[str]:
    text = _out(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                 "--no-breaks", "--no-replaces", "--no-enhances", *XEN_ROOTS])
    names = {ln.strip() for ln in text.splitlines() if ln and not ln.startswith(" ") and not ln.startswith("<")}
    return sorted(n for n in names if FAMILY.search(n))


def lists_stamp() -> str:
    """Changes whenever apt's package lists change: versions resolved under one stamp stay valid."""
    h = hashlib.sha256()
    for f in sorted(LISTS.glob("*_Packages*")):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve(cache: Path) -> dict[str, str]:
    """Package name -> candidate version for everything the rig unpacks. Remembered per state
    of apt's lists, so a rerun asks apt nothing."""
    memo = cache / f"versions-{lists_stamp()}.json"
    if memo.exists():
        return dict(json.loads(memo.read_text()))
    pkgs = sorted(set(xen_closure() + [kernel_package()] + EXTRA))
    info = show(pkgs)
    versions = {p: info[p]["Version"] for p in pkgs}
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("versions-*.json"):
        old.unlink()
    memo.write_text(json.dumps(versions, indent=1, sort_keys=True))
    return versions


def deb_name(pkg: str, version: str) -> str:
    # apt-get download names files with the epoch's ':' escaped as %3a
    return f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"


def download(versions: dict[str, str], into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    missing = [p for p, v in versions.items() if not (into / deb_name(p, v)).exists()]
    if missing:
        # apt drops privileges to _apt for the download; give it the directory
        shutil.chown(into, user="_apt")
        p = subprocess.run(["apt-get", "download", "-q", *[f"{m}={versions[m]}" for m in missing]],
                           cwd=into, capture_output=True, text=True)
        if p.returncode != 0:
            raise DebError(f"apt-get download failed: {p.stderr.strip()[-2000:]}")
    files = [into / deb_name(p, v) for p, v in versions.items()]
    absent = [f.name for f in files if not f.exists()]
    if absent:
        raise DebError(f"apt-get download did not produce {absent}")
    return files


def unpack(debs: list[Path], tree: Path) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
