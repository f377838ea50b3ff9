#!/bin/bash
# The rig guest's whole userland, as one initramfs built from the dom0's own files:
# busybox, Debian's Python with only the modules tests/tools/oracle.py loads, the oracle,
# xenstore-read/-write (the control channel to dom0), the disk driver, and guest/init.
#   mkinitramfs.sh OUT.cpio.gz
#   ORACLE   the oracle (default: tests/tools/oracle.py of this checkout)
#   KVER     the guest kernel's version, for its modules (default: the running kernel's)
#   MODULES  modules to load at boot, with their dependencies (default: xen-blkfront)
#   MODDIR   modprobe's --dirname, for modules outside /lib/modules (default: none)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${ORACLE:=$here/../../tests/tools/oracle.py}"
: "${KVER:=$(uname -r)}"
: "${MODULES=xen-blkfront}"
: "${MODDIR:=}"
PYTHON=/usr/bin/python3   # Debian's, whatever else is on PATH
[ $# = 1 ] || { echo "usage: ${0##*/} OUT.cpio.gz" >&2; exit 2; }
out=$1
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# a file at the same path inside the image (symlinks resolved)
add() {
    local f
    for f; do
        [ -e "$root$f" ] && continue
        mkdir -p "$root$(dirname "$f")"
        cp -L "$f" "$root$f"
    done
}
# an ELF file and the shared libraries it loads, at the paths the loader looks for them
add_elf() {
    add "$1"
    # ldd lines: "libx.so => /lib/.../libx.so (0x..)" and "/lib64/ld-linux-x86-64.so.2 (0x..)";
    # for a static binary (busybox) it fails with "not a dynamic executable"
    { ldd "$1" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        add "$lib"
    done
}

add_elf /bin/busybox
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp}
add_elf "$(readlink -f "$PYTHON")"
ln -sf "$(readlink -f "$PYTHON")" "$root/usr/bin/python3"
# xenstore-read/-write/-rm are one binary that looks at the name it is called by
add_elf /usr/bin/xenstore
for t in read write rm; do ln -sf xenstore "$root/usr/bin/xenstore-$t"; done

# the stdlib modules the oracle loads, found by running each of its commands once on a
# scratch file (argparse and gettext import more on first use than on import), plus all of
# encodings
"$PYTHON" -I -S -c '
import os, runpy, shutil, sys, tempfile
oracle = sys.argv[1]
os.O_DIRECT = 0   # the scratch file may be on tmpfs, which refuses O_DIRECT
d = tempfile.mkdtemp()
f = os.path.join(d, "disk")
open(f, "wb").truncate(1 << 20)
sys.stdout = open(os.devnull, "w")
for argv in (["fill", f], ["write", f, "--record", f + ".rec", "--count", "10"],
             ["check", f, "--record", f + ".rec"], ["digest", f]):
    sys.argv = [oracle, *argv]
    try:
        runpy.run_path(oracle, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
shutil.rmtree(d)
for m in list(sys.modules.values()):
    if getattr(m, "__file__", None):
        print(m.__file__, file=sys.__stdout__)
' "$ORACLE" | sort -u | while read -r f; do
    case $f in *.so) add_elf "$f" ;; *) add "$f" ;; esac
done
stdlib=$("$PYTHON" -I -S -c 'import os; print(os.path.dirname(os.__file__))')
mkdir -p "$root$stdlib" && cp -r "$stdlib/encodings" "$root$stdlib/"
install -m 0644 "$ORACLE" "$root/oracle.py"

# modules in dependency order; the kernel cannot load xz/zstd-compressed ones from busybox's
# insmod, so they go in uncompressed
: > "$root/modules.order"
for m in $MODULES; do
    modprobe ${MODDIR:+--dirname="$MODDIR"} -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}' | while read -r ko; do
        dst=/lib/modules/$KVER/$(basename "${ko%.xz}")
        dst=${dst%.zst}
        grep -qx "$dst" "$root/modules.order" && continue
        mkdir -p "$root$(dirname "$dst")"
        case $ko in
            *.xz) xz -dc "$ko" > "$root$dst" ;;
            *.zst) zstd -qdc "$ko" > "$root$dst" ;;
            *) cp "$ko" "$root$dst" ;;
        esac
        echo "$dst" >> "$root/modules.order"
    done
done

install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$out.tmp"
mv "$out.tmp" "$out"
echo "[${0##*/}] $out: $(du -h "$out" | cut -f1), modules: $(tr '\n' ' ' < "$root/modules.order")"
