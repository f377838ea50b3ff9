#!/bin/bash
# dmmig itself, with the README's install command, from the checkout in DMMIG_SRC (Vagrant
# syncs the repository to /vagrant). Also installs the Xen block script block-dmmig.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

[ -x "$DMMIG_SRC/install.sh" ] || die "no dmmig checkout at $DMMIG_SRC (set DMMIG_SRC=)"
log "running $DMMIG_SRC/install.sh"
(cd "$DMMIG_SRC" && ./install.sh)

# what the rig relies on, checked now rather than half-way through a migration
command -v dmmig >/dev/null || die "dmmig is not on PATH after install.sh"
[ -x /etc/xen/scripts/block-dmmig ] || die "/etc/xen/scripts/block-dmmig missing: the checkout has no hotplug/block-dmmig"
log "installed: $(dmmig --version), /etc/xen/scripts/block-dmmig"
