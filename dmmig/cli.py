"""Command line. The one error boundary: every DmmigError becomes a plain message, a hint
and a distinct exit code; --debug shows the traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dmmig import __version__
from dmmig import journal as J
from dmmig.dm.dmsetup import DmSetup
from dmmig.errors import DmmigError, Exit
from dmmig.runner import SubprocessRunner
from dmmig.stack import Stack
from dmmig.validate import parse_size


def make_stack(args: argparse.Namespace) -> Stack:
    from dmmig.udev import wait_dm_node
    runner = SubprocessRunner()
    return Stack(runner, DmSetup(runner, wait_node=wait_dm_node), J.Journal(J.state_dir(args.state_dir)))


def cmd_wrap(a: argparse.Namespace) -> int:
    print(make_stack(a).wrap(a.name, a.origin))
    return 0


def cmd_unwrap(a: argparse.Namespace) -> int:
    make_stack(a).unwrap(a.name, force=a.force)
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    table = make_stack(a).prepare(a.name, block_bytes=parse_size(a.block_size), metadata=a.metadata)
    print(f"dmmig-{a.name}: {table.render()}")
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    print(make_stack(a).checkpoint(a.name))
    return 0


def cmd_dirty(a: argparse.Namespace) -> int:
    ranges, bs, now = make_stack(a).dirty(a.name, a.since)
    total = sum(r.count for r in ranges) * bs
    if a.json:
        print(json.dumps({"block_bytes": bs, "since_era": a.since, "current_era": now, "total_bytes": total,
                          "extents": [[r.begin * bs, r.end * bs] for r in ranges]}))
    else:
        for r in ranges:
            print(f"{r.begin * bs}-{r.end * bs} ({r.count * bs} bytes)")
        print(f"total {total} bytes in {sum(r.count for r in ranges)} block(s) of {bs} bytes, "
              f"written since era {a.since} (era now {now})")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from dmmig.status import disk_status, render
    stack = make_stack(a)
    names = [a.name] if a.name else stack.journal.names()
    if not names:
        print("no disks managed by dmmig" if not a.json else "[]")
        return 0
    sts = [disk_status(stack, n) for n in names]
    if a.json:
        print(json.dumps(sts if not a.name else sts[0], indent=1))
    else:
        print("\n".join(render(s) for s in sts))
    return 0


def cmd_abort(a: argparse.Namespace) -> int:
    for step in make_stack(a).abort(a.name):
        print(f"done: {step}")
    print(f"{a.name}: aborted; dmmig-{a.name} is linear over its origin")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmig", description=__doc__ and "Live-migrate local Xen blkback "
                                "disks with device-mapper (dm-era + dm-mirror over NBD).")
    p.add_argument("--version", action="version", version=f"dmmig {__version__}")
    p.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    p.add_argument("--state-dir", help=f"journal directory (default $DMMIG_STATE_DIR or {J.DEFAULT_STATE_DIR})")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("wrap", cmd_wrap, "create /dev/mapper/dmmig-NAME as linear over ORIGIN (idempotent)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("origin", metavar="ORIGIN", help="block device: LV, partition or loop device")

    sp = verb("unwrap", cmd_unwrap, "remove /dev/mapper/dmmig-NAME")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--force", action="store_true", help="also while open or while a migration is in progress")

    sp = verb("prepare", cmd_prepare, "insert dm-era under the top device, live")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--block-size", default="64K", metavar="SIZE",
                    help="era block = mirror region size; power of two, multiple of 4K (default 64K)")
    sp.add_argument("--metadata", metavar="DEV", help="era metadata device (default: a file in the state dir)")

    sp = verb("checkpoint", cmd_checkpoint, "start a new era; print its number")
    sp.add_argument("name", metavar="NAME")

    sp = verb("dirty", cmd_dirty, "print the extents written since an era")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--since", type=int, default=1, metavar="ERA", help="default 1: everything since prepare")
    sp.add_argument("--json", action="store_true")

    sp = verb("status", cmd_status, "show phase, device stack, era and problems")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("--json", action="store_true")

    sp = verb("abort", cmd_abort, "return to linear over the origin and remove everything else (any phase)")
    sp.add_argument("name", metavar="NAME")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    fn: Callable[[Any], int] = args.fn
    try:
        return fn(args)
    except DmmigError as e:
        if args.debug:
            logging.exception("failed")
        print(f"dmmig {args.verb}: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  what to do: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print(f"dmmig {args.verb}: interrupted; `dmmig status` shows what is left", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the boundary: report, never a bare traceback
        if args.debug:
            raise
        print(f"dmmig {args.verb}: internal error: {type(e).__name__}: {e}\n"
              "  what to do: rerun with --debug and report the traceback", file=sys.stderr)
        return int(Exit.FAILED)
