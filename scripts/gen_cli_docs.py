#!/usr/bin/env python3
"""Write docs/cli.md from click's own help of every ggufmix command, so the reference never drifts.

Usage:
    python scripts/gen_cli_docs.py            # (re)write docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md differs from what the code says

The output depends only on the code: a fixed help width, commands in click's (alphabetical) order,
no terminal or environment in it. Rerun it after changing any command or flag; tests/test_docs.py
fails while docs/cli.md is stale.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's ggufmix, not whichever one is installed

import click  # noqa: E402

from ggufmix.cli import cli  # noqa: E402

OUT = ROOT / "docs" / "cli.md"
WIDTH = 100  # help text width: fixed, so the file does not depend on the terminal it was made in

_HEAD = """# Command line reference

Generated from the commands' own `--help` by `python scripts/gen_cli_docs.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the code disagree). The README shows one example per
verb; every option of every verb is here.
"""


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    return cmd.get_help(ctx).rstrip() + "\n", ctx


def render() -> str:
    """The whole page: the group's help, then one section per command."""
    text, root = _help(cli, "ggufmix", None)
    parts = [_HEAD, "## ggufmix\n", "```text\n" + text + "```\n"]
    assert isinstance(cli, click.Group)
    for name in cli.list_commands(root):
        cmd = cli.get_command(root, name)
        if cmd is None or cmd.hidden:
            continue
        sub, _ = _help(cmd, name, root)
        parts += [f"## ggufmix {name}\n", "```text\n" + sub + "```\n"]
    return "\n".join(parts)


def main() -> int:
    """Write or check docs/cli.md; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/cli.md is stale")
    args = ap.parse_args()
    want = render()
    have = OUT.read_text() if OUT.exists() else ""
    if args.check:
        if have == want:
            return 0
        diff = difflib.unified_diff(have.splitlines(), want.splitlines(), "docs/cli.md", "from the code", lineterm="")
        print("\n".join(list(diff)[:60]))
        print("docs/cli.md is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
        return 1
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(want)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(want.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
