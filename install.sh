#!/bin/bash
# On Debian 12, as root:
#   ./install.sh deb    build the Debian package dist/dmmig_VERSION_all.deb from this checkout,
#                       installing only its build dependencies (debian/control); install it on
#                       real hosts with `apt install ./dist/dmmig_VERSION_all.deb`
#   ./install.sh        install dmmig from this checkout for development, with everything its
#                       tests and demo need (the rigs' tools); /usr/local/bin/dmmig -> the venv
#   ./install.sh demo   that, then a migration between two simulated hosts (user-mode-linux rig)
#   ./install.sh test   that, then the whole test suite
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)

# The package: built from a copy of the checkout (the checkout keeps no build products and its
# .venv is left alone), with Debian's /usr/bin/python3 and a plain PATH (a pyenv or venv python
# first on PATH would otherwise build and test it). DEB_BUILD_OPTIONS=nocheck skips the unit
# tests the build runs.
build_deb() {
  if ! dpkg-checkbuilddeps 2>/dev/null; then
    echo "install.sh: installing the package's build dependencies (debian/control)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
    apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null
  fi
  local version
  version=$(dpkg-parsechangelog -S Version)
  tmp=$(mktemp -d)  # global: the EXIT trap runs after this function returned
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/dmmig-$version"
  tar -c --exclude-vcs --exclude=./.venv --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=.pybuild --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache . |
    tar -x -C "$tmp/dmmig-$version"
  (cd "$tmp/dmmig-$version" &&
     env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$tmp" LANG=C.UTF-8 \
       ${DEB_BUILD_OPTIONS:+DEB_BUILD_OPTIONS="$DEB_BUILD_OPTIONS"} dpkg-buildpackage -b -us -uc) \
    >"$tmp/build.log" 2>&1 || { tail -n 40 "$tmp/build.log" >&2; echo "install.sh: the package build failed" >&2; exit 1; }
  mkdir -p dist
  mv "$tmp/dmmig_${version}_all.deb" dist/
  echo "install.sh: built dist/dmmig_${version}_all.deb; install it with: apt install ./dist/dmmig_${version}_all.deb"
}

case "${1:-}" in
  deb) build_deb; exit 0 ;;
  ""|demo|test) ;;
  *) echo "usage: $0 [deb|demo|test]" >&2; exit 2 ;;
esac

PKGS=(
  # dmmig at run time; its Python libraries are Debian's, the ones the package depends on
  dmsetup thin-provisioning-tools nbd-client qemu-utils libnbd-bin python3-libnbd
  python3-paramiko python3-pyudev python3-pyxs python3-tqdm python3-cryptography
  openssh-client udev kmod util-linux iproute2 iputils-ping
  # the destination side (dmmig agent) and the rig's second host
  openssh-server
  # venv from Debian's own python3, so python3-libnbd is visible
  python3 python3-venv python3-pip
  # the real-kernel rig: user-mode-linux (Linux 6.1 as a process), a compiler for its shim
  user-mode-linux gcc libc6-dev ethtool procps psmisc e2fsprogs
  # the Xen rig (tests/xenrig): real Xen under QEMU emulation, artifacts unpacked from Debian packages
  qemu-system-x86 cpio busybox-static
  # the Vagrant rig's checks (vagrant validate with its libvirt provider, shellcheck, LVM in
  # the rig, the guest initramfs also uses busybox-static and cpio from the line above)
  vagrant vagrant-libvirt shellcheck lvm2 xenstore-utils
  # the Debian package's man page test (tools/cli_docs.py) and its lintian check in .ci/run
  python3-argparse-manpage lintian
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv runs dmmig on Debian's python3-* libraries (through its system site packages), so
# the tests and benches run what the package runs on a host: only the `test` extra comes from
# PyPI. A venv in which pip installed its own copies (made before Debian's were there) is remade.
debian_libs() {
  .venv/bin/python - <<'EOF' 2>/dev/null
import importlib, sys
for m in ("nbd", "paramiko", "pyudev", "pyxs", "tqdm", "cryptography", "nacl", "bcrypt"):
    f = importlib.import_module(m).__file__ or ""
    if not f.startswith("/usr/lib/python3/"):
        sys.exit(f"{m}: {f}")
EOF
}
if [ ! -x .venv/bin/python ] || ! debian_libs; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# editable_mode=compat: a plain path in a .pth file. setuptools' default editable install adds
# an import hook whose import cost 0.1 s of every Python start in the rig (dmmig there, and each
# `dmmig agent` on the destination), which the package, the benches' subject, does not have.
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" --config-settings editable_mode=compat

# the Xen block script and udev rules, where the machine has Xen / udev
if [ -d hotplug ] && [ -f hotplug/block-dmmig ]; then
  install -d /etc/xen/scripts && install -m 0755 hotplug/block-dmmig /etc/xen/scripts/block-dmmig
fi
if [ -d udev-rules ] && ls udev-rules/*.rules >/dev/null 2>&1; then
  install -d /etc/udev/rules.d && install -m 0644 udev-rules/*.rules /etc/udev/rules.d/
fi
ln -sf "$here/.venv/bin/dmmig" /usr/local/bin/dmmig

case "${1:-}" in
  demo) shift; exec .venv/bin/python -m tests.rig.demo "$@" ;;
  # two workers, each with its own rig kernels: a rig waits on its kernel more than it computes
  # (one worker kept 0.8 of this machine's two cores busy). -n 0 runs in this process (-s, Xen).
  test) shift; exec .venv/bin/python -m pytest -ra -n "${DMMIG_TEST_WORKERS:-2}" --dist worksteal "$@" ;;
  "") echo "install.sh: installed; dmmig is $(command -v dmmig)" ;;
esac
