"""The command line dmmig runs on the destination over SSH, for paramiko's sessions and
OpenSSH's tunnel alike (and which a forced command accepts). Kept apart from dmmig.adapters.ssh so that
the tunnel and the disk stack do not import paramiko: every dmmig command would pay for it."""
from __future__ import annotations

import shlex
from typing import Protocol


class Target(Protocol):
    """How dmmig logs in on the destination and runs itself there (the journal's destination,
    records.Destination, is one)."""
    @property
    def host(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def known_hosts(self) -> str: ...
    @property
    def identity(self) -> str | None: ...
    @property
    def remote_dmmig(self) -> str: ...
    @property
    def remote_state_dir(self) -> str | None: ...


def agent_argv(dest: Target, *mode: str) -> list[str]:
    """The one command dmmig runs on the destination, in every mode (`dmmig agent`, `... relay
    NAME`, `... hold NAME`, `... probe TOKEN`): a forced command parses exactly this."""
    return agent_command(dest.remote_dmmig, dest.remote_state_dir, *mode)


def agent_command(remote_dmmig: str, state_dir: str | None, *mode: str) -> list[str]:
    return [remote_dmmig, *(["--state-dir", state_dir] if state_dir else []), "agent", *mode]


def remote_command(argv: list[str]) -> str:
    """SSH carries one string, which the destination's shell splits (or a forced command's
    SSH_ORIGINAL_COMMAND holds): every word quoted."""
    return " ".join(shlex.quote(a) for a in argv)
