"""The README cannot rot: every Python block runs (in order, in one namespace, in a scratch
directory), the TOML config example validates, every ``lorank`` command line parses with the
real argument parser and names files that exist, and the README links nothing outside the
project.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is not run; the reason is
printed in the test's output.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(
    r"(?P<marker><!-- readme-test: skip \((?P<reason>[^)]*)\) -->\s*)?"
    r"^(?P<indent>[ ]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```",
    re.S | re.M,
)


def blocks(lang: str) -> list[tuple[str, str | None]]:
    out = []
    for m in FENCE.finditer(README):
        if m.group("lang") == lang:
            indent = len(m.group("indent"))
            body = "\n".join(line[indent:] for line in m.group("body").splitlines())
            out.append((body, m.group("reason")))
    return out


def command_lines(body: str) -> list[str]:
    """Logical lines (``\\`` continuations joined), comments dropped."""
    text = body.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_every_python_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = 0
    for body, skip in blocks("python"):
        if skip:
            print(f"skipped a block: {skip}")
            continue
        exec(compile(body, "README.md", "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 2


def test_the_config_example_validates():
    from lorank.training.config import validate_config

    (body, _), *_ = blocks("toml")
    validate_config(tomllib.loads(body))


def test_every_lorank_command_parses_and_names_existing_files():
    from lorank.cli import _parser
    from lorank.training.config import find_config

    parser = _parser()
    checked = 0
    for body, _ in blocks("bash"):
        for line in command_lines(body):
            words = shlex.split(line)
            if words[0] == "torchrun":
                words = ["lorank", *words[words.index("lorank") + 1 :]]
            if words[0] == "make":
                targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), re.M)
                assert words[1] in targets, line
                continue
            if words[0] != "lorank" or "--help" in words:
                continue  # help pages run in the test below
            args = parser.parse_args(words[1:])  # exits (fails the test) on a bad flag
            config = getattr(args, "config", None)
            if config and config != "CONFIG":
                find_config(config)  # a packaged config by name, or a file that exists
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("command", [["methods"], ["train", "--help"], ["compare", "--help"]])
def test_the_commands_the_readme_points_to_run(command, capsys):
    from lorank.cli import main

    try:
        assert main(command) == 0
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out


def test_the_readme_links_nothing_outside_the_project():
    assert "../" not in README
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert target.startswith(("http", "#")) or (ROOT / target).exists(), target
