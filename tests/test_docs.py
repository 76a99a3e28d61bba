"""The documentation's links lead somewhere, and the README stays short.

Every relative link and image in README.md and docs/*.md names a file that exists (relative to
the linking file), and every anchor (`page.md#anchor`, `#anchor`) names a heading of its target
under GitHub's slug rules. Links inside fenced code blocks and inline code are not links; web and
mail links are not checked. Pure Python: no Ray, no torch."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.DOTALL)
# [text](target) and ![alt](target); the target may be <in brackets> and have a "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line, with the lines of fenced code blocks left empty."""
    out, fence = [], ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if not fence and m:
            fence = m.group(1)
        elif fence and m and m.group(1).startswith(fence) and not line.strip().strip(fence[0]):
            fence = ""  # the closing fence: the same character, at least as many, nothing else
        elif not fence:
            out.append((number, line))
            continue
        out.append((number, ""))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text without markup, lowercase, punctuation dropped
    (hyphens, underscores and spaces kept), spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code; a link's text may wrap."""
    text = "\n".join(line for _, line in prose_lines(path))
    # inline code (within a paragraph) is not a link: blank it, keeping the line breaks
    text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = [(m.start(), m.group(1)) for m in LINK.finditer(text)]
    found += [(m.start(), m.group(1)) for m in REFERENCE.finditer(text)]
    return sorted((text.count("\n", 0, start) + 1, target.strip("<>")) for start, target in found)


def broken_links(files: list[Path]) -> list[str]:
    """'file:line: target (why)' for every link that leads nowhere."""
    problems, cache = [], {}
    for path in files:
        for number, target in links(path):
            if not target or SCHEME.match(target):
                continue  # web, mail and other absolute links are not checked
            where = f"{path.relative_to(ROOT)}:{number}: ({target})"
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{where} no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
                continue
            if not anchor or dest.suffix != ".md":
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(anchor) not in cache[dest]:
                problems.append(f"{where} no heading with anchor #{anchor} in {dest.relative_to(ROOT)} "
                                f"(anchors there: {', '.join(sorted(cache[dest])) or 'none'})")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = broken_links(doc_files())
    assert not problems, f"{len(problems)} broken link(s):\n" + "\n".join(problems)


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move detail to docs/"
    assert lines[0].startswith("# "), "README.md starts with its title"
    rest = [line for line in lines[1:] if line.strip()]
    assert rest and FENCE.match(rest[0]), "the first thing after README.md's title is the code block of the two commands"
    end = next(i for i, line in enumerate(rest[1:], 1) if FENCE.match(line))
    block = "\n".join(rest[1:end])
    assert "make compare" in block and "make test" in block, f"README.md's first code block:\n{block}"


def test_the_checker_finds_what_is_broken(tmp_path, monkeypatch):
    """The checker itself: a missing file, a missing anchor and an image are caught, with file and
    line; code, web links and duplicate headings are handled as GitHub does."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Re-run: `make compare` (3 seeds)\n\n## Notes\n\n## Notes\n\n"
        "[ok](#re-run-make-compare-3-seeds) [dup](#notes-1) [web](https://example.com/x.md#nope)\n"
        "![ok](img.png) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](#notes-2) ![gone](img/none.png) [b](b.md#there)\n")
    (tmp_path / "b.md").write_text("# B\n\n[back](a.md#title)\n")
    problems = broken_links([tmp_path / "a.md", tmp_path / "b.md"])
    assert len(problems) == 4, problems
    assert all(p.startswith("a.md:14:") for p in problems), problems
    assert {p.split(": ", 1)[1].split(")")[0] for p in problems} == {
        "(missing.md", "(#notes-2", "(img/none.png", "(b.md#there"}
