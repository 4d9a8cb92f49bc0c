"""The README and docs/ point at things that exist: every relative link names a file (and, for a page, a heading),
and every benchmark command they quote uses flags its script takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a command's arguments run to the end of its line, or on past a trailing backslash (never into the next command)
COMMAND = re.compile(r"benchmarks/(\w+)\.py((?:(?:[ \t]+|[ \t]*\\\n[ \t]*)(?:--[\w-]+|[^\s`|;)\\]+))*)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(target)
        elif frag and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
            if frag not in {anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_benchmark_commands_use_real_flags(page):
    wrong = []
    for name, args in COMMAND.findall(page.read_text()):
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.exists():
            wrong.append(f"benchmarks/{name}.py (no such script)")
            continue
        source = script.read_text()
        wrong += [f"{name}.py {flag}" for flag in re.findall(r"--[\w-]+", args) if f'"{flag}"' not in source]
    assert not wrong, f"{page.name}: commands the scripts would refuse: {wrong}"


def test_the_checks_see_links_and_commands():
    """Guards the patterns themselves: the README links into docs/ and quotes benchmark commands with flags."""
    readme = (ROOT / "README.md").read_text()
    assert any(t.startswith("docs/") for t in relative_links(ROOT / "README.md"))
    assert any(re.search(r"--\w", args) for _, args in COMMAND.findall(readme))
    assert anchor("Measured performance (benchmarks print ratios against a baseline timed in the same run)") == \
        "measured-performance-benchmarks-print-ratios-against-a-baseline-timed-in-the-same-run"


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("[a-z]*.py")), ids=lambda p: p.name)
def test_every_benchmark_script_imports(script):
    """A quoted command must at least start: each script's imports resolve against the package as it is now
    (`eigh_pool.py` kept importing a function the package had dropped). Loading runs the imports, not `main`."""
    import importlib.util
    import sys

    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.path.remove(str(script.parent))
