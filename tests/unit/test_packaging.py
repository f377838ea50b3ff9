"""The Debian package's generated parts (tools/cli_docs.py): the bash completion and the man
page cover every verb, option and exit code of the parser the CLI runs; the versions agree."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dmmig import __version__
from dmmig.entry.cli import build_parser
from dmmig.errors import Exit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import cli_docs  # noqa: E402  # a build-time script, not part of the dmmig package


def long_options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")}


def complete(script: str, *lines: str) -> list[list[str]]:
    """COMPREPLY for each LINE (words split on spaces; the last word is the one completed),
    from the completion SCRIPT in a real bash."""
    calls = "".join(f"t {line}\n" for line in lines)
    prog = (f"{script}\n"
            't() { COMP_WORDS=("$@"); COMP_CWORD=$(($#-1)); COMPREPLY=(); _dmmig; echo "${COMPREPLY[*]}"; }\n'
            f"{calls}")
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return [ln.split() for ln in out.split("\n")[:len(lines)]]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_completion_offers_every_verb_each_verbs_options_and_their_choices() -> None:
    parser = build_parser()
    verbs = cli_docs.verbs(parser)
    assert {"migrate", "status", "abort", "hotplug", "agent"} <= set(verbs)
    script = cli_docs.completion(parser)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    lines = ["dmmig ''", "dmmig --state-dir /tmp ''", "dmmig mig"] + [f"dmmig {v} x --" for v in verbs]
    lines += ["dmmig migrate dom host --transport ''", "dmmig hotplug ''", "dmmig migrate dom host -- -"]
    got = complete(script, *lines)
    assert got[0] == list(verbs) and got[1] == list(verbs) and got[2] == ["migrate"]
    for (v, sp), words in zip(verbs.items(), got[3:3 + len(verbs)]):
        assert set(words) == long_options(sp), v
    assert got[-3] == ["ssh", "nbd"]
    assert got[-2] == ["add", "remove"]
    assert got[-1] == []  # after `--` the words are xl migrate's


def test_the_man_page_has_every_verb_option_and_exit_code_and_no_hard_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (_has("build_manpages") or _has("argparse_manpage")):
        pytest.skip("needs argparse-manpage (Debian: python3-argparse-manpage)")
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal must not shape the page
    parser = build_parser()
    page = cli_docs.manpage(parser, "2026-01-01")
    assert page.startswith(f'.TH DMMIG 1 "2026-01-01" "dmmig {__version__}"')
    assert "\n.br\n" not in page
    for v, sp in cli_docs.verbs(parser).items():
        section = page.split(f".SH OPTIONS 'dmmig {v}'\n", 1)[1].split("\n.SH ", 1)[0]
        for o in long_options(sp) - {"--help"}:
            assert o.replace("-", "\\-") in section, (v, o)
    codes = page.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    assert re.findall(r"\\fB(\d+)\\fR", codes) == [str(int(e)) for e in Exit]
    if shutil.which("man"):
        r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", "-"], input=page, text=True,
                           capture_output=True, env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and r.stderr == "", r.stderr


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_the_package_pyproject_and_module_versions_agree() -> None:
    changelog = (ROOT / "debian" / "changelog").read_text().split("\n", 1)[0]
    version = re.fullmatch(r"dmmig \(([^)]+)\) \S+; urgency=\w+", changelog)
    assert version, changelog
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version[1] == pyproject == __version__
