"""The leg watcher's own entry: what cutover starts (MirrorSide.start_watcher), with the words
of `dmmig --state-dir STATE watch NAME`, which are its marker (proc.find). Not through
`python -m dmmig`, which imports the CLI and the disk stack first: ~0.3 s more of a rig
kernel's one CPU, which the cutover's set-up and resync share with it.
"""
from __future__ import annotations

import logging
import sys

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core.watch import watch
from dmmig.names import top_name
from dmmig.validate import disk_name

USAGE = "python -m dmmig.entry.watch --state-dir STATE watch NAME --after-stdin"


def main(argv: list[str]) -> int:
    """ARGV: --state-dir STATE watch NAME --after-stdin (the first look once stdin ends)."""
    if len(argv) != 5 or argv[0] != "--state-dir" or argv[2] != "watch" or argv[4] != "--after-stdin":
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    state, name = argv[1], disk_name(argv[3])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    return watch(DmSetup(SubprocessRunner()), state, name, top_name(name), sys.stdin.buffer.read)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
