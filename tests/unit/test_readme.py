"""The README says what the CLI does: every default it shows in a command's [...] is the CLI's."""

from __future__ import annotations

import os
import re

import click
import pytest

from components.cli import main

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
PLACEHOLDER = r"[A-Z][A-Z0-9_=]*(\.[a-z]+)?"  # DIR, N, FILE.png: not a default
ROW = re.compile(r"^\| `panoptic ([a-z -]+?)(?: [A-Z-]|\s*\[|\s*--|`)(.*?)` \|", re.M)


def _command(path: str) -> click.Command:
    cmd, ctx = main, click.Context(main)
    for word in path.split():
        cmd = cmd.get_command(ctx, word)
        assert cmd is not None, f"README names `panoptic {path}`, which does not exist"
    return cmd


def documented_defaults() -> list[tuple[str, str, str]]:
    """(command, --option, value) for every `--option value` inside [...] in the CLI table."""
    out = []
    for m in ROW.finditer(open(README).read()):
        path, rest = m.group(1).strip(), m.group(0)
        for bracket in re.findall(r"\[([^\]]*)\]", rest):
            tokens = bracket.split()
            for opt, value in zip(tokens, tokens[1:] + [""]):
                literal = value and not value.startswith("--") and not re.fullmatch(PLACEHOLDER, value)
                if opt.startswith("--") and literal and "..." not in value and "=" not in value:
                    out.append((path, opt, value))
    return out


def test_the_table_documents_defaults():
    assert len(documented_defaults()) >= 15


@pytest.mark.parametrize("path,opt,value", documented_defaults(), ids=lambda v: str(v))
def test_documented_default_is_the_cli_default(path, opt, value):
    cmd = _command(path)
    param = next((p for p in cmd.params if opt in getattr(p, "opts", [])), None)
    assert param is not None, f"README shows `panoptic {path} {opt}`, which the CLI does not take"
    default = param.default() if callable(param.default) else param.default
    if isinstance(default, float):
        assert float(value) == default, (path, opt, value, default)
    else:
        assert str(default if default is not None else "all") == value, (path, opt, value, default)
