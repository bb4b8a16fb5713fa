"""The README's Quickstart holds exactly two commands, the run and the tests,
each a Makefile target; real Criteo data has its own section, outside it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sections(markdown: str) -> list[tuple[int, str, str]]:
    """(level, title, body) of each heading; a body runs to the next heading
    of the same or a higher level (subsections included), fenced code blocks
    skipped when looking for headings."""
    lines = markdown.splitlines()
    headings, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)):
            headings.append((i, len(m.group(1)), m.group(2)))
    sections = []
    for n, (i, level, title) in enumerate(headings):
        end = next((j for j, lvl, _ in headings[n + 1 :] if lvl <= level), len(lines))
        sections.append((level, title, "\n".join(lines[i + 1 : end])))
    return sections


def _commands(body: str) -> list[str]:
    """The shell commands of the fenced code blocks in ``body``: one per
    line, continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", body, flags=re.S | re.M):
        block = re.sub(r"\s*\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def _section(title_pattern: str) -> tuple[int, str, str]:
    sections = [s for s in _sections((ROOT / "README.md").read_text()) if re.search(title_pattern, s[1], re.I)]
    assert len(sections) == 1, f"README.md: {len(sections)} sections titled like {title_pattern!r}"
    return sections[0]


def test_quickstart_holds_exactly_two_commands():
    _, _, body = _section(r"^quick\s*start$")
    commands = _commands(body)
    assert len(commands) == 2, f"the Quickstart must hold two commands (run, test), not {commands}"
    run, test = commands
    assert run == "make main" and test == "make test", commands
    makefile = (ROOT / "Makefile").read_text()
    for command in commands:
        assert re.search(rf"^{command.split()[1]}:", makefile, re.M), f"no Makefile target for {command!r}"
    # CI runs the README's test command.
    assert test in (ROOT / ".ci/run").read_text()


def test_criteo_instructions_have_their_own_section():
    _, _, quickstart = _section(r"^quick\s*start$")
    assert "criteo" not in quickstart.lower()
    level, title, body = _section(r"criteo")
    assert level == 2, f"the Criteo section {title!r} must be a section of its own, not under another"
    commands = _commands(body)
    assert any("convert_criteo" in c for c in commands) and any("criteo" in c and "train" in c for c in commands)


def test_sections_parser():
    text = "# A\n\n## Quickstart\n\n```bash\nmake x   # run\n# comment\ncmd \\\n  --flag\n```\n\n### Sub\n\n```\n# not a heading\nthree\n```\n## Next\n"
    sections = {title: (level, body) for level, title, body in _sections(text)}
    assert set(sections) == {"A", "Quickstart", "Sub", "Next"}
    assert _commands(sections["Quickstart"][1]) == ["make x", "cmd --flag", "three"]
    assert _commands(sections["Next"][1]) == []
