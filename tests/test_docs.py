"""The docs cannot drift from the code: every shell command in README.md and docs/*.md is parsed by
click (verb and every flag must exist, values must convert), scripts they name must exist and take
the flags they are given, docs/cli.md must equal what scripts/gen_cli_docs.py makes, every verb is in
the README, every script is documented, and no committed file names a path of one particular machine.

Conventions the docs follow so this works: commands live in fenced ```bash / ```sh / ```console
blocks (console: only ``$ `` lines are commands); ``[...]`` marks an optional part whose flags are
still checked; ``# ...`` starts a comment.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from ggufmix.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(bash|sh|console|shell)[ \t]*\n(.*?)^```", re.M | re.S)
_SEPARATORS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}
_PREFIXES = {"do", "then", "else", "time", "exec", "!"}


@dataclass(frozen=True)
class Command:
    """One command line found in a doc: where, and its words after shell splitting."""

    where: str
    words: tuple[str, ...]


def _shell_lines(lang: str, body: str) -> list[tuple[int, str]]:
    """(line offset in the block, command line) with continuation lines joined."""
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for i, line in enumerate(body.splitlines()):
        if pending is None:
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # program output
                line = line[2:]
            pending = (i, "")
        text = pending[1] + line.strip() + " "
        pending = (pending[0], text[:-2] + " " if line.rstrip().endswith("\\") else text)
        if not line.rstrip().endswith("\\"):
            lines.append((pending[0], pending[1].strip()))
            pending = None
    if pending is not None:
        lines.append((pending[0], pending[1].strip()))
    return lines


def _segments(line: str) -> list[list[str]]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in _SEPARATORS:
            out.append([])
        else:
            out[-1].append(tok)
    return [s for s in out if s]


def _strip(words: list[str]) -> list[str]:
    """Drop environment assignments, `nice -n N`, loop keywords; unwrap [optional] parts."""
    while words and (words[0] in _PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0])):
        words = words[1:]
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    words = [w.strip("[]") for w in words]
    return [w for w in words if w and w != "..."]


def _commands() -> list[Command]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in _FENCE.finditer(text):
            first = text[: m.start()].count("\n") + 2
            for offset, line in _shell_lines(m.group(1), m.group(2)):
                for seg in _segments(line):
                    words = _strip(seg)
                    if words:
                        found.append(Command(f"{doc.relative_to(ROOT)}:{first + offset}", tuple(words)))
    return found


def _ggufmix_args(words: tuple[str, ...]) -> tuple[str, ...] | None:
    if words[0] == "ggufmix":
        return words[1:]
    if words[0] in ("python", "python3") and words[1:3] == ("-m", "ggufmix"):
        return words[3:]
    return None


def _script(words: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    rest = words[1:] if words[0] in ("python", "python3", "bash", "sh") else words
    if rest and rest[0].startswith("scripts/"):
        return rest[0], rest[1:]
    return None


def _inline() -> list[Command]:
    """Commands quoted in running text or tables (`ggufmix plan --fit 4GB`): often fragments, so only
    their verb and flags are checked, not their arguments."""
    found = []
    for doc in DOCS:
        text = _FENCE.sub("", doc.read_text())
        for m in re.finditer(r"`((?:ggufmix|python3? (?:-m ggufmix|scripts/)|bash scripts/)[^`]*)`", text):
            for seg in _segments(m.group(1)):
                words = _strip(seg)
                if words:
                    found.append(Command(f"{doc.relative_to(ROOT)} (inline)", tuple(words)))
    return found


COMMANDS = _commands()
GGUFMIX = [(c.where, a) for c in COMMANDS if (a := _ggufmix_args(c.words)) is not None]
INLINE = [(c.where, a) for c in _inline() if (a := _ggufmix_args(c.words)) is not None]
SCRIPTS = [(c.where, *s) for c in COMMANDS + _inline() if (s := _script(c.words)) is not None]


def parse_ggufmix(args: tuple[str, ...]) -> click.Context | None:
    """Parse a ggufmix command line the way click will, without running it: the verb must exist, every
    flag must be one of its options and every value must convert. Returns the verb's context (None
    for the group's own --help/--version)."""
    root = click.Context(cli, info_name="ggufmix")
    rest = list(args)
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag in ("--help", "--version"):
            return None
        if flag not in ("-q", "--quiet", "--debug"):
            raise click.UsageError(f"no such option of ggufmix: {flag}")
    if not rest:
        raise click.UsageError("no verb")
    cmd = cli.get_command(root, rest[0])
    if cmd is None:
        raise click.UsageError(f"no such command: {rest[0]}")
    try:
        return cmd.make_context(rest[0], rest[1:], parent=root)
    except click.exceptions.Exit:  # --help
        return None


def test_the_docs_have_commands() -> None:
    assert len(GGUFMIX) >= 20, f"only {len(GGUFMIX)} ggufmix commands found in fenced blocks: is the fence regex right?"
    assert SCRIPTS, "no scripts/ commands found in the docs"


@pytest.mark.parametrize(("where", "args"), GGUFMIX, ids=[f"{w} {' '.join(a[:1])}" for w, a in GGUFMIX])
def test_ggufmix_command_parses(where: str, args: tuple[str, ...]) -> None:
    try:
        parse_ggufmix(args)
    except click.UsageError as e:
        pytest.fail(f"{where}: `ggufmix {shlex.join(args)}`: {e.format_message()}")


def _flags(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


@pytest.mark.parametrize(("where", "args"), INLINE, ids=[f"{w} {' '.join(a[:2])}" for w, a in INLINE])
def test_inline_command_names_real_flags(where: str, args: tuple[str, ...]) -> None:
    words = [w for w in args if w not in ("-q", "--quiet", "--debug")]
    if not words or words[0] in ("--help", "--version"):
        return
    cmd = cli.get_command(click.Context(cli), words[0])
    assert cmd is not None, f"{where}: no such command: ggufmix {words[0]}"
    unknown = [w for w in words[1:] if re.match(r"-[^\d]", w) and w.split("=", 1)[0] not in _flags(cmd)]
    assert not unknown, f"{where}: `ggufmix {shlex.join(args)}`: {words[0]} has no {', '.join(unknown)}"


def test_a_renamed_flag_is_caught() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_ggufmix(("build", "m.gguf", "--budget", "4bpw", "-o", "o.gguf", "--no-such-flag"))
    with pytest.raises(click.UsageError):
        parse_ggufmix(("no-such-verb",))
    with pytest.raises(click.BadParameter):
        parse_ggufmix(("plan", "s.json", "--ctx", "0", "-o", "p.json"))


def test_readme_shows_every_verb() -> None:
    readme = {a[0] for w, a in GGUFMIX if w.startswith("README.md") and a}
    missing = sorted(set(cli.commands) - readme)
    assert not missing, f"README.md has no example of: {', '.join(missing)} (one fenced example per verb)"


@pytest.mark.parametrize(("where", "script", "args"), SCRIPTS, ids=[f"{w} {s}" for w, s, _ in SCRIPTS])
def test_script_command_exists(where: str, script: str, args: tuple[str, ...]) -> None:
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    source = path.read_text()
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        # argparse names a flag in quotes; a shell script in a `case` pattern
        pattern = rf"""["']{re.escape(flag)}["']""" if path.suffix == ".py" else rf"(?<![\w-]){re.escape(flag)}(?![\w-])"
        assert re.search(pattern, source), f"{where}: {script} takes no {flag}"


def test_cli_md_is_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_script_is_documented() -> None:
    text = "\n".join(d.read_text() for d in DOCS)
    missing = [p.name for p in sorted((ROOT / "scripts").iterdir()) if p.is_file() and f"scripts/{p.name}" not in text]
    assert not missing, f"scripts not named in README.md or docs/: {', '.join(missing)}"


def test_commands_are_fenced() -> None:
    """Indented command lines outside fences would escape the checks above."""
    for doc in DOCS:
        bare = _FENCE.sub("", re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S))
        hits = re.findall(r"^(?: {4}|\t)\s*(?:ggufmix|python|bash) .*$", bare, re.M)
        assert not hits, f"{doc.name}: commands outside a fenced block: {hits[:3]}"


_MACHINE_PATH = re.compile(r"(?<![\w.~$}])/(?:work|root|home|Users|tmp)/")


def test_no_machine_specific_paths() -> None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = []
    for name in files:
        path = ROOT / name
        if name.startswith("tests/") or path.suffix not in {".py", ".md", ".sh", ".json", ".toml", ".txt", ""}:
            continue
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _MACHINE_PATH.search(line):
                bad.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not bad, "paths of one machine in committed files:\n" + "\n".join(bad)


def test_pictures_exist_and_are_small() -> None:
    """Every picture a page embeds is committed beside it, and small enough to keep in git."""
    for doc in DOCS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text()):
            path = (doc.parent / target).resolve()
            assert path.is_file(), f"{doc.name}: picture {target} does not exist"
            assert path.stat().st_size < 150_000, f"{doc.name}: {target} is {path.stat().st_size} bytes (keep < 150 KB)"


def test_links_between_pages_resolve() -> None:
    """Relative links ([text](docs/x.md#part)) name files that exist, and headings that exist in them."""
    for doc in DOCS:
        for target in re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            assert path.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor and path.suffix == ".md":
                heads = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                         for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}
                assert anchor in heads, f"{doc.name}: link to {target}: no such heading"
