"""The Vagrant rig (vagrant/) as far as it can be checked without hardware virtualization:
the Vagrantfile passes `vagrant validate` with the libvirt provider's own checks, every
script passes shellcheck, and the pure-shell helpers do what the provisioning relies on.
(What runs in a kernel, LVM and the SSH key exchange, is in tests/kernel/test_vagrant_provision.py.)

These shell out to Debian's `vagrant` (with `vagrant-libvirt`) and `shellcheck`, which the
README's install command installs."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
PROVISION = VAGRANT_DIR / "provision"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (the README's install command installs it)")
    return path


def validate(vagrant_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ,
               # nothing of Vagrant's state lands in the repository or in ~/.vagrant.d
               VAGRANT_HOME=str(tmp_path / "vagrant-home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
               # the provider this Vagrantfile is for: validate checks its settings too
               VAGRANT_DEFAULT_PROVIDER="libvirt",
               VAGRANT_CHECKPOINT_DISABLE="1")
    return subprocess.run([need("vagrant"), "validate"], cwd=vagrant_dir, env=env,
                          capture_output=True, text=True, timeout=120)


def scratch_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, dst, ignore=shutil.ignore_patterns(".vagrant", ".keys"))
    return dst


# ---- vagrant validate ---------------------------------------------------------------------


def test_vagrantfile_validates_with_the_libvirt_provider(tmp_path: Path) -> None:
    r = validate(VAGRANT_DIR, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    # validating must not have made keys or machine state in the checkout
    assert not (VAGRANT_DIR / ".keys").exists()
    assert not (VAGRANT_DIR / ".vagrant").exists()


def test_the_libvirt_plugin_is_there_so_its_settings_are_checked(tmp_path: Path) -> None:
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"), VAGRANT_CHECKPOINT_DISABLE="1")
    r = subprocess.run([need("vagrant"), "plugin", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vagrant-libvirt" in r.stdout, f"Debian's vagrant-libvirt package is missing: {r.stdout}"


def test_validate_rejects_a_misspelt_libvirt_setting(tmp_path: Path) -> None:
    """The control for the test above: validate really reads the provider block."""
    d = scratch_copy(tmp_path)
    vf = d / "Vagrantfile"
    text = vf.read_text()
    assert "lv.nested = true" in text
    vf.write_text(text.replace("lv.nested = true", "lv.nestd = true"))
    r = validate(d, tmp_path)
    assert r.returncode != 0
    assert "nestd" in r.stdout + r.stderr


def test_validate_rejects_a_missing_provisioning_script(tmp_path: Path) -> None:
    d = scratch_copy(tmp_path)
    (d / "provision" / "50-guest.sh").unlink()
    r = validate(d, tmp_path)
    assert r.returncode != 0
    assert "50-guest.sh is missing" in r.stdout + r.stderr


def test_vagrant_up_makes_the_keys_before_anything_else(tmp_path: Path) -> None:
    """`vagrant up` as far as it gets here: its trigger runs keys-init.sh (from a path with a
    space in it) before the provider starts, and the provider then stops at libvirt, which
    this machine lacks. The box catalog points at a closed local port, so nothing is fetched."""
    where = tmp_path / "a dir"
    where.mkdir()
    d = shutil.copytree(VAGRANT_DIR, where / "vagrant", ignore=shutil.ignore_patterns(".vagrant", ".keys"))
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_CHECKPOINT_DISABLE="1",
               VAGRANT_SERVER_URL="http://127.0.0.1:9")
    r = subprocess.run([need("vagrant"), "up", "dmmig-a", "--no-provision"], cwd=d, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, "vagrant up cannot succeed on a machine without libvirt"
    assert "Running trigger" in out, out
    for host in ("dmmig-a", "dmmig-b"):
        for f in ("id_ed25519", "id_ed25519.pub", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            assert (d / ".keys" / host / f).is_file(), out


def test_every_provisioning_script_is_wired_into_the_vagrantfile() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    steps = sorted(p.name for p in PROVISION.glob("[0-9][0-9]-*.sh"))
    assert steps == ["00-packages.sh", "10-xen-boot.sh", "20-lvm.sh", "30-dmmig.sh", "40-ssh-keys.sh",
                     "50-guest.sh"]
    assert "%w[" + " ".join(steps) + "]" in text


# ---- shellcheck ---------------------------------------------------------------------------


def shell_scripts() -> list[Path]:
    out = []
    for p in sorted(VAGRANT_DIR.rglob("*")):
        if not p.is_file() or ".vagrant" in p.parts or ".keys" in p.parts:
            continue
        head = p.read_bytes()[:64]
        if p.suffix == ".sh" or head.startswith((b"#!/bin/sh", b"#!/bin/bash")):
            out.append(p)
    return out


def test_every_script_passes_shellcheck() -> None:
    scripts = shell_scripts()
    names = {str(p.relative_to(VAGRANT_DIR)) for p in scripts}
    # the list is not vacuous: these are the scripts the rig runs
    assert {"scenario.sh", "guest/init", "guest/mkinitramfs.sh", "guest/guestctl.sh", "provision/lib.sh",
            "provision/keys-init.sh", "provision/40-ssh-keys.sh"} <= names
    r = subprocess.run([need("shellcheck"), "--external-sources", "--severity=style", *map(str, scripts)],
                       cwd=VAGRANT_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_flags_what_it_should(tmp_path: Path) -> None:
    """The control: the same invocation fails on a script with an unquoted expansion."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/bash\nf=$1\nrm -f $f\n')
    r = subprocess.run([need("shellcheck"), "--external-sources", "--severity=style", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SC2086" in r.stdout


def test_scripts_are_executable_and_strict() -> None:
    for p in shell_scripts():
        rel = p.relative_to(VAGRANT_DIR)
        if rel.name == "lib.sh":  # sourced, never run
            continue
        assert os.access(p, os.X_OK), f"{rel} is not executable"
        if rel.as_posix() != "guest/init":  # PID 1 of the guest must never exit on an error
            assert "set -euo pipefail" in p.read_text(), f"{rel} lacks set -euo pipefail"


# ---- the shell helpers --------------------------------------------------------------------


def sh(script: str, **env: str) -> str:
    r = subprocess.run(["bash", "-c", script], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_lib_names_peers_and_addresses() -> None:
    lib = PROVISION / "lib.sh"
    hosts = "x=10.0.0.1 y=10.0.0.2 z=10.0.0.3"
    assert sh(f". {lib}; peers", SELF="y", HOSTS=hosts).split() == ["x", "z"]
    assert sh(f". {lib}; addr_of z", SELF="y", HOSTS=hosts).strip() == "10.0.0.3"
    assert sh(f". {lib}; addr_of nope || echo absent", SELF="y", HOSTS=hosts).strip() == "absent"


def test_package_list_is_printed_without_root() -> None:
    pkgs = sh(f"{PROVISION / '00-packages.sh'} --list").split()
    assert "xen-system-amd64" in pkgs and "lvm2" in pkgs
    assert len(pkgs) == len(set(pkgs))


def test_keys_init_makes_each_hosts_keys_once(tmp_path: Path) -> None:
    need("ssh-keygen")
    keys = tmp_path / "keys"
    init = PROVISION / "keys-init.sh"
    sh(f"{init} {keys} h1 h2")
    files = {f"{h}/{k}{s}" for h in ("h1", "h2") for k in ("id_ed25519", "ssh_host_ed25519_key")
             for s in ("", ".pub")}
    assert {str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file() and p.name != ".lock"} == files
    before = {f: (keys / f).read_bytes() for f in files}
    assert oct((keys / "h1" / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    sh(f"{init} {keys} h1 h2 h3")   # a rerun keeps what exists and adds the new host's
    assert {f: (keys / f).read_bytes() for f in files} == before
    assert (keys / "h3" / "ssh_host_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")
    # every key its own
    pubs = [(keys / f).read_text().split()[1] for f in files if f.endswith(".pub")]
    assert len(set(pubs)) == len(pubs)


def test_the_scenario_calls_dmmig_migrate_as_the_cli_defines_it() -> None:
    """scenario.sh cannot run here; at least every `dmmig migrate` it runs must parse with
    dmmig's own argument parser (a renamed option would otherwise surface only on hardware)."""
    import re
    import shlex

    from dmmig.entry.cli import build_parser
    text = (VAGRANT_DIR / "scenario.sh").read_text()
    m = re.search(r"^mig_opts=\((.*?)\)$", text, re.M | re.S)
    assert m, "scenario.sh defines mig_opts"
    subst = {"$TRANSPORT": "ssh", "$SSH_DIR": "/root/.ssh", "$GUEST": "dmguest", "$peer_addr": "192.168.56.12",
             "$self_addr": "192.168.56.11"}

    def words(s: str) -> list[str]:
        for k, v in subst.items():
            s = s.replace(k, v)
        return shlex.split(s)
    mig_opts = words(m.group(1).replace("\n", " "))
    calls = re.findall(r'dmmig migrate ("\$GUEST" "\$\w+"(?: --[\w-]+)*) "\$\{mig_opts\[@\]\}"', text)
    assert len(calls) == 3, calls  # the plan, there, and back
    for c in calls:
        a = build_parser().parse_args(["migrate", *words(c), *mig_opts])
        assert (a.domain, a.transport, a.known_hosts) == ("dmguest", "ssh", "/root/.ssh/known_hosts")
