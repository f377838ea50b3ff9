"""The command line dmmig runs on the destination over SSH, for paramiko's sessions and
OpenSSH's tunnel alike (and which a forced command accepts). Kept apart from dmmig.adapters.ssh so that
the tunnel and the disk stack do not import paramiko: every dmmig command would pay for it."""
from __future__ import annotations

import shlex
from typing import Any


def agent_argv(dest: dict[str, Any], *mode: str) -> list[str]:
    """The one command dmmig runs on the destination, in every mode (`dmmig agent`, `... relay
    NAME`, `... hold NAME`, `... probe TOKEN`): a forced command parses exactly this."""
    state = dest.get("remote_state_dir")
    return [str(dest["remote_dmmig"]), *(["--state-dir", str(state)] if state else []), "agent", *mode]


def remote_command(argv: list[str]) -> str:
    """SSH carries one string, which the destination's shell splits (or a forced command's
    SSH_ORIGINAL_COMMAND holds): every word quoted."""
    return " ".join(shlex.quote(a) for a in argv)
