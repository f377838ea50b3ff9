"""The man page and the bash completion of dmmig, generated from its argparse parser at build
time (debian/rules; anyone else: `PYTHONPATH=. python3 tools/cli_docs.py man dmmig.1`), so
neither can drift from the options the code takes.

  man        roff by Debian's python3-argparse-manpage (it renders subcommands as sections),
             plus the sections argparse does not know: exit status (from dmmig.errors.Exit),
             environment, files, see also.
  completion a static bash completion: verbs, each verb's options, their choices, file names
             where an option takes a path. Static rather than python3-argcomplete: no runtime
             dependency, no hook in the CLI, and a <TAB> does not start Python (~0.1 s each).

Build-time only: not part of the installed dmmig package (imports dmmig.entry.cli, which imports
nothing outside the standard library at module level).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time
from collections.abc import Iterator

from dmmig import __version__
from dmmig.core.journal import DEFAULT_STATE_DIR
from dmmig.entry.cli import build_parser
from dmmig.errors import Exit

SHORT = "live-migrate the local disks of Xen domains with device-mapper"
# metavars whose values are paths: the completion offers file names for them
PATH_METAVARS = {"FILE", "DIR", "DEV", "PATH", "ORIGIN"}


def verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:  # argparse has no public accessor for its subparsers
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def exit_codes() -> Iterator[tuple[int, str]]:
    """(value, meaning) for each dmmig.errors.Exit: the meaning is the member's comment in the
    source (the one place the codes are explained), else its name."""
    comments = dict(re.findall(r"^\s*([A-Z_]+)\s*=\s*\d+\s*#\s*(.+)$", inspect.getsource(Exit), re.M))
    for e in Exit:
        yield int(e), comments.get(e.name, e.name.lower().replace("_", " "))


def _roff(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq")


def _extra_sections() -> str:
    out = [".SH EXIT STATUS", ".TP", "\\fB0\\fR", "success"]
    for code, why in exit_codes():
        if code:
            out += [".TP", f"\\fB{code}\\fR", _roff(why)]
    out += [".SH ENVIRONMENT", ".TP", "\\fBDMMIG_STATE_DIR\\fR",
            _roff(f"the journal directory when --state-dir is not given (default {DEFAULT_STATE_DIR})."),
            ".TP", "\\fBDMMIG_AGENT_CONF\\fR",
            _roff("the agent's confinement settings (default /etc/dmmig/agent.conf).")]
    out += [".SH FILES", ".TP", "\\fB/etc/xen/scripts/block\\-dmmig\\fR",
            _roff("the Xen block script: a disk line `script=block-dmmig,target=DEV` makes libxl run "
                  "`dmmig hotplug add|remove` for it."),
            ".TP", "\\fB/lib/udev/rules.d/57\\-dmmig.rules\\fR",
            _roff("keeps blkid, LVM and multipath off the devices inside a migrating disk; names the "
                  "top device /dev/dmmig/NAME."),
            ".TP", f"\\fB{_roff(DEFAULT_STATE_DIR)}\\fR", "the journal: one file per disk dmmig manages.",
            ".TP", "\\fB/etc/dmmig/agent.conf\\fR",
            _roff("the destination agent's file roots, device patterns and creation limits.")]
    out += [".SH SEE ALSO", "\\fBxl\\fR(1), \\fBdmsetup\\fR(8), \\fBera_invalidate\\fR(8), \\fBnbd\\-client\\fR(8), "
            "\\fBqemu\\-nbd\\fR(8), \\fBssh\\fR(1)"]
    return "\n".join(out) + "\n"


def manpage(parser: argparse.ArgumentParser, date: str) -> str:
    try:
        from build_manpages.manpage import Manpage  # Debian 12's python3-argparse-manpage (1.2)
    except ImportError:
        from argparse_manpage.manpage import Manpage  # its later releases
    parser.man_short_description = SHORT  # type: ignore[attr-defined]  # read by Manpage for NAME
    # argparse wraps help text at the terminal's width ($COLUMNS) and argparse-manpage turns each
    # wrap into a hard .br: a width no text reaches leaves the filling to man, whatever the terminal
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"
    try:
        body = str(Manpage(parser))
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    head, _, rest = body.partition("\n")
    assert head.startswith(".TH "), head
    # argparse-manpage 1.2 writes `.TH dmmig "1" Manual`: no date, no version
    th = f'.TH DMMIG 1 "{date}" "dmmig {__version__}" "User Commands"'
    return th + "\n" + rest + _extra_sections()


def _options(p: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """P's option strings, and for each option taking a value what its value completes from:
    a word list, or "@files" / "@dirs"."""
    opts: list[str] = []
    values: dict[str, str] = {}
    for a in p._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS:
            continue
        opts += a.option_strings
        if a.nargs == 0:
            continue
        remote = a.option_strings[-1].startswith("--remote-")  # a path on the destination, not here
        what = (" ".join(str(c) for c in a.choices) if a.choices else "" if remote else
                "@dirs" if a.metavar == "DIR" or a.option_strings[-1].endswith("-dir") else
                "@files" if a.metavar in PATH_METAVARS else "")
        for o in a.option_strings:
            values[o] = what
    return opts, values


def _positional_choices(p: argparse.ArgumentParser) -> str:
    words = [str(c) for a in p._actions if not a.option_strings and a.choices and a.help != argparse.SUPPRESS
             for c in a.choices]
    return " ".join(words)


def completion(parser: argparse.ArgumentParser) -> str:
    gopts, gvalues = _options(parser)
    vs = verbs(parser)
    cases = []
    for name, sp in vs.items():
        opts, values = _options(sp)
        val_cases = "".join(f"            {o}) _dmmig_values '{w}'; return ;;\n" for o, w in values.items())
        cases.append(f"        {name})\n"
                     f"            case $prev in\n{val_cases}"
                     f"            esac\n"
                     f"            _dmmig_words '{' '.join(opts)}' '{_positional_choices(sp)}'; return ;;\n")
    gval_cases = "".join(f"                {o}) _dmmig_values '{w}'; return ;;\n" for o, w in gvalues.items())
    return f"""# bash completion for dmmig {__version__}: generated from its argparse parser (tools/cli_docs.py)
_dmmig_values() {{
    case $1 in
        @files) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null ;;
        @dirs) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null ;;
        *) COMPREPLY=($(compgen -W "$1" -- "$cur")) ;;
    esac
}}

# options of the verb (or its positional choices when the word does not start with -)
_dmmig_words() {{
    if [[ $cur == -* || -z $2 ]]; then
        COMPREPLY=($(compgen -W "$1" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$2" -- "$cur"))
    fi
}}

_dmmig() {{
    local cur prev verb i w
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    # the verb: the first word that is neither an option nor a global option's value
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        case $w in
            {'|'.join(o for o in gvalues) or '--'}) ((i++)) ;;
            -*) ;;
            *) verb=$w; break ;;
        esac
    done
    # after `migrate ... --` the words are xl migrate's
    if [[ $verb == migrate ]]; then
        for ((i = i + 1; i < COMP_CWORD; i++)); do [[ ${{COMP_WORDS[i]}} == -- ]] && return; done
    fi
    case $verb in
        "")
            case $prev in
{gval_cases}            esac
            _dmmig_words '{' '.join(gopts)}' '{' '.join(vs)}'; return ;;
{''.join(cases)}    esac
}}
complete -F _dmmig dmmig
"""


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("man", "completion"):
        print("usage: cli_docs.py man|completion OUT", file=sys.stderr)
        return 2
    parser = build_parser()
    # reproducible builds: the date of the source (dpkg-buildpackage sets SOURCE_DATE_EPOCH)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    text = manpage(parser, time.strftime("%Y-%m-%d", time.gmtime(epoch))) if argv[0] == "man" else completion(parser)
    os.makedirs(os.path.dirname(os.path.abspath(argv[1])), exist_ok=True)
    with open(argv[1], "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
