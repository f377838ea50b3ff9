"""The Vagrant rig's provisioning, run for real where it needs no Xen: the package list
against Debian's archive, the volume group script on a loop device in a rig kernel, the SSH
key exchange between the two rig kernels of `pair`, and the guest's initramfs.

The rig's root file system is this machine's own (hostfs): every path the scripts would
write outside their tmpfs (/root/.ssh, /etc/ssh, /etc/lvm) is pointed at /run/... in the
guest, and the tests check that this machine's copies stayed untouched."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ORACLE
from tests.rig.pair import A_IP, B_IP
from tests.rig.uml import ROOT, UmlHost

PROVISION = ROOT / "vagrant" / "provision"
GUEST = ROOT / "vagrant" / "guest"


def tree(path: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under path on this machine, to prove it was left alone."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


# ---- (a) the package list -----------------------------------------------------------------


def test_every_package_the_provisioning_installs_is_in_debian() -> None:
    """Not in the rig: apt's view of Debian 12's archive on this machine is enough."""
    pkgs = subprocess.run([str(PROVISION / "00-packages.sh"), "--list"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert len(pkgs) >= 10
    sources = subprocess.run(["apt-cache", "policy"], capture_output=True, text=True, check=True).stdout
    assert "bookworm" in sources, "apt knows no Debian 12 archive here: run `apt-get update`"
    # real packages (not purely virtual), each with an installable candidate
    show = subprocess.run(["apt-cache", "show", "--no-all-versions", *pkgs], capture_output=True, text=True).stdout
    real = set(re.findall(r"^Package: (\S+)$", show, re.M))
    policy = subprocess.run(["apt-cache", "policy", *pkgs], capture_output=True, text=True).stdout
    candidate = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (.*)$", policy, re.M))
    missing = [p for p in pkgs if p not in real or candidate.get(p, "(none)") == "(none)"]
    assert not missing, f"not installable from Debian's archive: {missing}"


# ---- (b) the volume group -----------------------------------------------------------------

# LVM inside the rig: udev's 69-lvm.rules (from lvm2) reacts to a new physical volume with
# `vgchange -aay --autoactivation event`, run by udevd with this machine's /etc/lvm, which
# writes its metadata archive and backup into this machine's /etc/lvm through hostfs. The
# override (same file name under /run/udev/rules.d wins over /lib/udev/rules.d) turns that
# off in the rig guest for the test; LVM_SYSTEM_DIR sends the scripts' own LVM commands to a
# tmpfs copy of lvm.conf, so their archive/backup land there too.
NO_AUTOACTIVATION = "# dmmig test: no LVM event autoactivation in this rig kernel (hostfs root)\n"


@pytest.fixture
def lvm_env(rig: UmlHost) -> Iterator[dict[str, str]]:
    sysdir = f"/run/lvm-{uuid.uuid4().hex[:6]}"
    rig.run(["sh", "-c", "mkdir -p /run/udev/rules.d && cat > /run/udev/rules.d/69-lvm.rules"],
            input=NO_AUTOACTIVATION.encode())
    rig.run(["udevadm", "control", "--reload"])
    rig.run(["mkdir", "-p", sysdir])
    rig.run(["cp", "/etc/lvm/lvm.conf", sysdir + "/"])
    try:
        yield {"LVM_SYSTEM_DIR": sysdir, "SELF": "rig"}
    finally:
        rig.run(["rm", "-rf", sysdir, "/run/udev/rules.d/69-lvm.rules"], check=False)
        rig.run(["udevadm", "control", "--reload"], check=False)


@pytest.mark.kernel
def test_lvm_script_makes_the_volume_group_on_a_loop_device(rig: UmlHost, disks, lvm_env) -> None:
    host_lvm = tree("/etc/lvm")
    dev = disks(64)
    vg = f"vg{uuid.uuid4().hex[:6]}"
    env = dict(lvm_env, DISK=dev, VG=vg, LV="guest", LV_SIZE="32M")
    script = str(PROVISION / "20-lvm.sh")
    try:
        r = rig.run([script], env=env, timeout=120)
        assert f"creating physical volume {dev} and volume group {vg}" in r.out
        lv = rig.run(["lvs", "--noheadings", "--units", "m", "-o", "vg_name,lv_name,lv_size", f"{vg}/guest"],
                     env=env).out.split()
        assert lv == [vg, "guest", "32.00m"]
        # udev made the LV's node, as blkback will open it: /dev/VG/LV, a dm device of ours
        assert rig.run(["test", "-b", f"/dev/{vg}/guest"], check=False).rc == 0
        assert rig.run(["dmsetup", "info", "-c", "--noheadings", "-o", "name", f"{vg}-guest"]).out.strip() \
            == f"{vg}-guest"
        pv = rig.run(["pvs", "--noheadings", "-o", "vg_name", dev], env=env).out.strip()
        assert pv == vg

        # idempotent: a rerun changes nothing and says so
        r = rig.run([script], env=env, timeout=120)
        assert f"volume group {vg} on {dev} exists" in r.out and f"logical volume {vg}/guest exists" in r.out
        assert rig.run(["lvs", "--noheadings", "-o", "lv_name", vg], env=env).out.split() == ["guest"]

        # a disk with a file system on it is refused, and left as it was
        other = disks(32)
        rig.run(["mkfs.ext4", "-q", other])
        r = rig.run([script], env=dict(env, DISK=other, VG=vg + "x"), check=False, timeout=120)
        assert r.rc != 0 and "refusing to wipe" in r.err, r.out + r.err
        assert rig.run(["blkid", "-o", "value", "-s", "TYPE", other]).out.strip() == "ext4"
        # and a VG of that name on another disk is not silently reused
        r = rig.run([script], env=dict(env, DISK=other), check=False, timeout=120)
        assert r.rc != 0 and f"{other} is not one of its physical volumes" in r.err
    finally:
        rig.run(["vgremove", "--yes", "--force", vg], env=env, check=False)
        rig.run(["pvremove", "--yes", dev], env=env, check=False)
    assert rig.run(["dmsetup", "info", f"{vg}-guest"], check=False).rc != 0
    assert tree("/etc/lvm") == host_lvm, "the test wrote into this machine's /etc/lvm"


# ---- (c) the SSH key exchange -------------------------------------------------------------

PORT = 2222   # the pair's own sshd has port 22 on b; ours run beside it on both hosts
HOSTS = f"rig-a={A_IP} rig-b={B_IP}"


def sshd_config(base: str, ip: str) -> str:
    # a Debian host's defaults for root (key only), with every path under the test's tmpfs;
    # StrictModes off because the rig's /run is a 1777 tmpfs
    return (f"ListenAddress {ip}:{PORT}\nHostKey {base}/etc/ssh_host_ed25519_key\n"
            f"AuthorizedKeysFile {base}/root/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {base}/sshd.pid\n")


def exchange(host: UmlHost, name: str, base: str, keys: Path) -> str:
    env = {"SELF": name, "HOSTS": HOSTS, "KEYS_DIR": str(keys), "SELF_KEYS": str(keys / name),
           "SSH_DIR": f"{base}/root", "SSHD_DIR": f"{base}/etc", "SSH_PORT": str(PORT),
           # reload our sshd when the host key changes, as `systemctl reload ssh` would
           "SSHD_RELOAD": f"[ ! -f {base}/sshd.pid ] || kill -HUP $(cat {base}/sshd.pid)"}
    return host.run([str(PROVISION / "40-ssh-keys.sh")], env=env, timeout=120).out


def ssh(host: UmlHost, base: str, ip: str, known_hosts: str | None = None) -> object:
    return host.run(["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                     "-o", f"UserKnownHostsFile={known_hosts or base + '/root/known_hosts'}",
                     "-o", "ConnectTimeout=10", "-i", f"{base}/root/id_ed25519", "-p", str(PORT),
                     f"root@{ip}", "hostname"], check=False, timeout=60)


@pytest.mark.kernel
@pytest.mark.twohost
def test_key_exchange_gives_strict_ssh_both_ways(pair: tuple[UmlHost, UmlHost], tmp_path: Path) -> None:
    a, b = pair
    host_root_ssh, host_etc_ssh = tree("/root/.ssh"), tree("/etc/ssh")
    base = f"/run/vtest-ssh-{uuid.uuid4().hex[:6]}"
    # keys made ahead, as `vagrant up` does on the workstation; a.shared is seen by both kernels
    keys = a.shared / "keys"
    subprocess.run([str(PROVISION / "keys-init.sh"), str(keys), "rig-a", "rig-b"], check=True,
                   capture_output=True)
    try:
        for h in (a, b):
            # /run/sshd: sshd's privilege separation directory (the pair made it on b only)
            h.run(["mkdir", "-p", "-m", "700", base, "/run/sshd"])
        # first run on each host: keys installed; the peer's sshd is not up yet
        out = {h.name: exchange(h, f"rig-{h.name}", base, keys) for h in (a, b)}
        for h, peer in ((a, B_IP), (b, A_IP)):
            assert f"installed {base}/etc/ssh_host_ed25519_key" in out[h.name]
            assert f"({peer}:{PORT}) not reachable yet" in out[h.name]
        for h, ip in ((a, A_IP), (b, B_IP)):
            h.run(["sh", "-c", f"cat > {base}/sshd_config"], input=sshd_config(base, ip).encode())
            h.run(["/usr/sbin/sshd", "-f", f"{base}/sshd_config"])
        # second run: nothing to install, and each peer presents exactly the expected key
        for h in (a, b):
            o = exchange(h, f"rig-{h.name}", base, keys)
            assert "presents the expected host key" in o and "installed" not in o, o
            # one line per peer, however often it runs
            assert len(h.run(["cat", f"{base}/root/authorized_keys"]).out.splitlines()) == 1
            assert len(h.run(["cat", f"{base}/root/known_hosts"]).out.splitlines()) == 1

        r = ssh(a, base, B_IP)
        assert r.rc == 0 and r.out.strip() == "b", r.err    # type: ignore[attr-defined]
        r = ssh(b, base, A_IP)
        assert r.rc == 0 and r.out.strip() == "a", r.err    # type: ignore[attr-defined]

        # strict checking is on: a known_hosts naming another key for b is refused, by the
        # script's check over the network and by ssh itself
        wrong = tmp_path / "wrong"
        shutil.copytree(keys, wrong)
        for f in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            (wrong / "rig-b" / f).unlink()
        subprocess.run([str(PROVISION / "keys-init.sh"), str(wrong), "rig-b"], check=True, capture_output=True)
        wrong_shared = a.shared / "wrong"
        shutil.copytree(wrong, wrong_shared)
        base2 = base + "-wrong"
        a.run(["mkdir", "-p", "-m", "700", f"{base2}/etc"])
        env = {"SELF": "rig-a", "HOSTS": HOSTS, "KEYS_DIR": str(wrong_shared), "SELF_KEYS": str(wrong_shared / "rig-a"),
               "SSH_DIR": f"{base2}/root", "SSHD_DIR": f"{base2}/etc", "SSH_PORT": str(PORT), "SSHD_RELOAD": "true"}
        r = a.run([str(PROVISION / "40-ssh-keys.sh")], env=env, check=False, timeout=120)
        assert r.rc != 0 and "presents a different host key" in r.err, r.out + r.err
        r = ssh(a, base, B_IP, known_hosts=f"{base2}/root/known_hosts")
        assert r.rc != 0 and "Host key verification failed" in r.err, r.err   # type: ignore[attr-defined]

        # the peer's key is only accepted from the peer's address on the migration network
        line = b.run(["cat", f"{base}/root/authorized_keys"]).out
        assert line.startswith(f'from="{A_IP}",') and line.rstrip().endswith("dmmig-rig:rig-a")
    finally:
        for h in (a, b):
            h.run(["sh", "-c", f"[ ! -f {base}/sshd.pid ] || kill $(cat {base}/sshd.pid)"], check=False)
            h.run(["sh", "-c", f"for i in $(seq 50); do [ -e {base}/sshd.pid ] || break; sleep 0.1; done; "
                   f"rm -rf {base} {base}-wrong"], check=False)
    assert tree("/root/.ssh") == host_root_ssh, "the test wrote into this machine's /root/.ssh"
    assert tree("/etc/ssh") == host_etc_ssh, "the test wrote into this machine's /etc/ssh"


# ---- (d) the guest's initramfs ------------------------------------------------------------


@pytest.mark.kernel
def test_guest_initramfs_runs_the_oracle_on_its_own(rig: UmlHost, disks, tmp_path: Path) -> None:
    """Built here (Debian's python3, busybox-static, xenstore-utils), then used in the rig as
    the guest uses it: a chroot of nothing but the image, the oracle on a block device."""
    kver = rig.run(["uname", "-r"]).out.strip()
    # the rig kernel's modules stand in for the guest's xen-blkfront: dm-era has a chain of
    # dependencies to put in order
    moddir = tmp_path / "mods"
    (moddir / "lib" / "modules").mkdir(parents=True)
    (moddir / "lib" / "modules" / kver).symlink_to(f"/usr/lib/uml/modules/{kver}")
    image = rig.shared / "initrd.gz"
    subprocess.run([str(GUEST / "mkinitramfs.sh"), str(image)], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, KVER=kver, MODDIR=str(moddir), MODULES="dm-era", ORACLE=ORACLE))
    root = f"/dev/shm/initrd-{uuid.uuid4().hex[:6]}"
    dev = disks(16)
    try:
        rig.run(["sh", "-c", f"mkdir {root} && cd {root} && zcat {image} | cpio -id --quiet"])
        order = rig.run(["cat", f"{root}/modules.order"]).out.split()
        assert [Path(m).name for m in order] == ["dm-mod.ko", "dm-bufio.ko", "dm-persistent-data.ko", "dm-era.ko"]
        rig.run(["mount", "-t", "devtmpfs", "devtmpfs", f"{root}/dev"])
        # the guest's init parses with the shell that runs it
        rig.run(["chroot", root, "/bin/busybox", "sh", "-n", "/init"])
        py = ["chroot", root, "/usr/bin/python3", "-I", "-S", "-X", "utf8", "/oracle.py"]
        rig.run(py + ["fill", dev, "--seed", "5"])
        w = rig.run(py + ["write", dev, "--seed", "5", "--record", "/run/rec.json", "--count", "300",
                          "--blocks", "0:512"])
        assert '"writes": 300' in w.out and '"errors": []' in w.out
        c = rig.run(py + ["check", dev, "--seed", "5", "--record", "/run/rec.json"])
        assert '"mismatches": 0' in c.out
        # and the checker in the image is a real one: a block changed behind its back is found
        rig.run(["dd", "if=/dev/zero", f"of={dev}", "bs=4096", "count=1", "seek=600", "oflag=direct",
                 "status=none"])
        c = rig.run(py + ["check", dev, "--seed", "5", "--record", "/run/rec.json"], check=False)
        assert c.rc == 1 and "block 600" in c.out
        # xenstore-read finds its libraries (it has no xenbus here, so it cannot connect)
        x = rig.run(["chroot", root, "/usr/bin/xenstore-read", "data/dmmig/cmd"], check=False)
        assert x.rc == 1 and "xs_open" in x.err and "shared libraries" not in x.err, x.err
    finally:
        rig.run(["umount", f"{root}/dev"], check=False)
        rig.run(["rm", "-rf", root], check=False)
