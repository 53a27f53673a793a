"""README.md and docs/*.md render as written, and name the checkpoints the configs load.

The markdown is rendered with a CommonMark renderer (markdown-it-py) and compared with a
plain line scan of the source: a code fence that is not alone on its line, or an unbalanced
fence, turns the rest of the page into code, which the scan and the renderer then disagree on.
"""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest

markdown_it = pytest.importorskip("markdown_it")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
CONVERTER = "sait_tf.tools.convert_torch"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
GIN_WEIGHTS = re.compile(r"""['"](weights/[^'"]+\.weights\.h5)['"]""")


def _read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def _scan(text: str) -> tuple[list[int], list[int], bool]:
    """(0-based lines that open a fence, heading lines outside fences, still inside a fence at
    the end), as the author meant them: a line ending in the fence (even glued to text, which
    CommonMark does not take as a closing fence) closes it."""
    openings, headings = [], []
    fence = None
    for number, line in enumerate(text.splitlines()):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                openings.append(number)
            elif line.startswith("#"):
                headings.append(number)
        elif re.search(f"{re.escape(fence[0])}{{{len(fence)},}}$", line.rstrip()):
            fence = None
    return openings, headings, fence is not None


def _tokens(text: str):
    return markdown_it.MarkdownIt("commonmark").parse(text)


@pytest.mark.parametrize("page", PAGES)
def test_every_heading_renders_as_a_heading(page):
    text = _read(page)
    _, headings, _ = _scan(text)
    rendered = {token.map[0] for token in _tokens(text) if token.type == "heading_open"}
    lines = text.splitlines()
    missing = [f"line {n + 1}: {lines[n]}" for n in headings if n not in rendered]
    assert not missing, f"{page}: heading lines not rendered as headings:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", PAGES)
def test_code_fences_are_balanced_and_alone_on_their_lines(page):
    text = _read(page)
    fence_lines = [n + 1 for n, line in enumerate(text.splitlines()) if FENCE.match(line)]
    assert len(fence_lines) % 2 == 0, f"{page}: odd number of fence lines: {fence_lines}"
    openings, _, unclosed = _scan(text)
    assert not unclosed, f"{page}: the fence opened on line {openings[-1] + 1} is never closed"
    glued = [f"line {n + 1}: {line}" for n, line in enumerate(text.splitlines())
             if ("```" in line or "~~~" in line) and not FENCE.match(line)]
    assert not glued, f"{page}: code fence not alone on its line:\n" + "\n".join(glued)
    rendered = [token.map[0] for token in _tokens(text) if token.type == "fence"]
    assert rendered == openings, (
        f"{page}: code blocks open on lines {[n + 1 for n in openings]} in the source but "
        f"render on lines {[n + 1 for n in rendered]}")


def _converter_commands(page: str) -> list[list[str]]:
    """argv of every ``python -m sait_tf.tools.convert_torch`` command in the page's code
    blocks (backslash continuations joined, comments dropped)."""
    commands = []
    for token in _tokens(_read(page)):
        if token.type != "fence":
            continue
        for command in token.content.replace("\\\n", " ").splitlines():
            if CONVERTER in command:
                words = shlex.split(command, comments=True)
                commands.append(words[words.index(CONVERTER) + 1:])
    return commands


def _output(argv: list[str]) -> str | None:
    for index, word in enumerate(argv):
        if word == "--output" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--output="):
            return word.split("=", 1)[1]
    return None


def _gin_weights() -> set[str]:
    paths = set()
    for gin_file in glob.glob(os.path.join(REPO, "gin", "*.gin")):
        with open(gin_file, encoding="utf-8") as f:
            paths.update(GIN_WEIGHTS.findall(f.read()))
    return paths


def test_the_configs_load_weights_files():
    assert _gin_weights() >= {"weights/deeplabv2_init.weights.h5",
                              "weights/fcn8s_init.weights.h5"}


@pytest.mark.parametrize("page", ["README.md", "docs/checkpoints.md"])
def test_every_weights_file_of_the_configs_is_a_documented_converter_output(page):
    outputs = {_output(argv) for argv in _converter_commands(page)}
    missing = sorted(_gin_weights() - outputs)
    assert not missing, (f"{page}: no `python -m {CONVERTER} ... --output PATH` command "
                         f"writes {missing}, which gin/*.gin load")


def test_documented_converter_commands_parse():
    from sait_tf.tools import convert_torch

    docstring = [line.strip() for line in convert_torch.__doc__.replace("\\\n", " ").splitlines()]
    docstring_outputs = {_output(shlex.split(line)) for line in docstring if CONVERTER in line}
    assert _gin_weights() <= docstring_outputs
    for page in ("README.md", "docs/checkpoints.md"):
        for argv in _converter_commands(page):
            values = convert_torch.parse_flags(["convert_torch", *argv])
            assert values.output == _output(argv)
