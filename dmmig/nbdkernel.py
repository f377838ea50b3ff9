"""The kernel's NBD client (nbd-client): the destination's export as a local /dev/nbdX, the
mirror's second leg.

Always with a request timeout: without one a dead peer hangs I/O forever (the kernel only
logs "Possible stuck request"); with one, requests fail with EIO and the mirror marks the leg
failed while the guest's writes complete on leg 0. Block size 512 so the top device's logical
block size does not change under blkback when the mirror is swapped in.
"""
from __future__ import annotations

import os

from dmmig.errors import DmmigError, RemoteError
from dmmig.runner import Runner


# udev-rules/57-dmmig.rules keeps blkid and LVM off nbd devices marked here: the leg holds
# the guest's data, and the marker must exist before the device connects
UDEV_MARKS = "/run/dmmig-nbd"


class NbdKernel:
    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def attached(self, dev: str) -> bool:
        return os.path.exists(f"/sys/block/{os.path.basename(dev)}/pid")

    def free_device(self) -> str:
        if not os.path.exists("/sys/block/nbd0"):
            self.r.run(["modprobe", "nbd"], check=False)
        devs = sorted((d for d in os.listdir("/sys/block") if d.startswith("nbd")), key=lambda d: int(d[3:]))
        if not devs:
            raise DmmigError("no /dev/nbdX devices: the nbd module is missing",
                             hint="modprobe nbd (or use a kernel with CONFIG_BLK_DEV_NBD)")
        for d in devs:
            if not self.attached(d) and _size(d) == 0:
                return f"/dev/{d}"
        raise DmmigError(f"all {len(devs)} nbd devices are in use", hint="modprobe nbd nbds_max=N")

    def attach(self, dev: str, export: str, *, timeout: int, unix: str | None = None,
               host: str | None = None, port: int | None = None, tls: str | None = None) -> None:
        """TLS: a directory with ca-cert.pem, client-cert.pem, client-key.pem; nbd-client then
        checks the server's certificate against the CA and HOST, and leaves a daemon of its own
        (command line naming TLS) proxying between the kernel's socket and the TLS connection."""
        if unix is not None:
            where = ["-u", unix]
        else:
            assert host is not None and port is not None
            where = [host, str(port)]
        if tls is not None:  # long options: 3.24's short option string lacks -F
            assert host is not None
            where += ["--enable-tls", "--cacertfile", os.path.join(tls, "ca-cert.pem"),
                      "--certfile", os.path.join(tls, "client-cert.pem"),
                      "--keyfile", os.path.join(tls, "client-key.pem"), "--tlshostname", host]
        os.makedirs(UDEV_MARKS, mode=0o700, exist_ok=True)
        with open(os.path.join(UDEV_MARKS, os.path.basename(dev)), "w"):
            pass
        res = self.r.run(["nbd-client", "-N", export, *where, dev, "-b", "512", "-t", str(timeout)],
                         check=False, timeout=60)
        if res.returncode != 0 or not self.attached(dev):
            _unmark(dev)
            raise RemoteError(f"nbd-client could not attach the destination's export to {dev}: "
                              f"{(res.stderr or res.stdout).strip()}")

    def detach(self, dev: str) -> None:
        if self.attached(dev):
            self.r.run(["nbd-client", "-d", dev], timeout=60)
        _unmark(dev)


def _unmark(dev: str) -> None:
    try:
        os.unlink(os.path.join(UDEV_MARKS, os.path.basename(dev)))
    except FileNotFoundError:
        pass


def _size(dev: str) -> int:
    try:
        with open(f"/sys/block/{dev}/size") as f:
            return int(f.read())
    except OSError:
        return 0
