"""The docs point at things that exist: every relative link and repo path cited in the markdown files, every
`docs/...` reference in code (anchors included), no citation of a file outside the repository, and the README's
commands and kernels snippet are the ones that work."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level folders a backticked path in the docs may start with; those paths are written from the repo root
REPO_DIRS = ("pgpo_kernels", "pgpo_train", "pgpo_bench", "benchmarks", "tests", "docs", "examples", ".ci")
CODE_SUFFIXES = {".py", ".sh", ".toml", ".cfg", ".yaml", ".yml"}
SKIP_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "node_modules", "__pycache__"}

SETUP_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                 'pip install -e ".[train,dev]" && pgpo-train')
TEST_COMMAND = "python -m pytest -q"


def _md_files() -> list[Path]:
    """README.md, docs/ and every other markdown file of the repository (benchmark results, integrations)."""
    return sorted({ROOT / "README.md", *(f for f in _tracked_files() if f.suffix == ".md")})


def _tracked_files() -> list[Path]:
    """The repository's files (git's list when this is a checkout, else a walk without build/venv folders)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        files = [ROOT / line for line in out.stdout.splitlines()]
    else:
        files = list(ROOT.rglob("*"))
    # a virtual environment or build folder git does not ignore is not the project's
    return [p for p in files if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
            and "site-packages" not in p.parts]


def _prose(text: str) -> str:
    """Markdown without HTML comments and fenced code blocks (commands there name files a run creates)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")  # a link counts as its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = md.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(text), flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _check_target(path: Path, anchor: str | None, where: str, problems: list[str]) -> None:
    if not path.exists():
        problems.append(f"{where}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist")
    elif anchor and path.suffix == ".md" and anchor not in anchors(path):
        problems.append(f"{where}: no anchor #{anchor} in {path.relative_to(ROOT)}")


def _expand(pattern: str) -> list[str]:
    """`a/{b,c}.md` -> [`a/b.md`, `a/c.md`] (one brace group is all the docs use)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def broken_doc_references(md: Path) -> list[str]:
    """Relative markdown links (with their anchors) and backticked repo paths of one markdown file that point
    nowhere."""
    problems: list[str] = []
    text = _prose(md.read_text())
    where = str(md.relative_to(ROOT))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        _check_target(md if not file_part else (md.parent / file_part).resolve(), anchor or None, where, problems)
    for code in re.findall(r"`([^`\n]+)`", text):
        for token in code.split():
            token = token.rstrip(".,;:)").split(":")[0]
            if "<" in token or not token.startswith(tuple(d + "/" for d in REPO_DIRS)):
                continue
            path_part, _, anchor = token.partition("#")
            for path in _expand(path_part):
                if any(c in path for c in "*?["):
                    if not glob.glob(str(ROOT / path)):
                        problems.append(f"{where}: `{path}` matches no file")
                else:
                    _check_target(ROOT / path, anchor or None, where, problems)
    return problems


def broken_code_references(files: list[Path]) -> list[str]:
    """`docs/...` paths cited in code (comments, docstrings, messages) that point nowhere."""
    problems: list[str] = []
    for f in files:
        if f.suffix not in CODE_SUFFIXES and f.name != "run":
            continue
        for lineno, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for path, anchor in re.findall(r"(?<![\w/.])(docs/[\w./-]*[\w/])(?:#([\w-]+))?", line):
                _check_target(ROOT / path, anchor or None, f"{f.relative_to(ROOT)}:{lineno}", problems)
    return problems


@pytest.mark.parametrize("md", _md_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_and_paths_exist(md):
    problems = broken_doc_references(md)
    assert not problems, "\n".join(problems)


def test_code_cites_existing_docs():
    problems = broken_code_references([f for f in _tracked_files() if f != Path(__file__).resolve()])
    assert not problems, "\n".join(problems)


def test_code_cites_existing_readme_sections():
    """`README "Architecture"` in a comment names a section the root README still has."""
    headings = {h.strip() for h in re.findall(r"^#{1,6}\s+(.+)$", _prose((ROOT / "README.md").read_text()), re.M)}
    problems = []
    for f in _tracked_files():
        if f.suffix not in CODE_SUFFIXES or f == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for name in re.findall(r'(?<![\w/.])README,? "([^"]+)"', line):
                if name not in headings:
                    problems.append(f"{f.relative_to(ROOT)}:{lineno}: README has no section {name!r}")
    assert not problems, "\n".join(problems)


def test_no_citation_outside_the_repository():
    """The method lives in docs/method.md: nothing cites the spec file the project was built from."""
    hits = []
    for f in _tracked_files():
        if f.suffix not in CODE_SUFFIXES | {".md"} or f == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if re.search(r"\bSPEC\b|shared/SPEC", line):
                hits.append(f"{f.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not hits, "cite docs/method.md#<anchor> instead:\n" + "\n".join(hits)


def test_the_checker_finds_what_is_broken(tmp_path, monkeypatch):
    """The checks above can fail: a dangling link, a missing anchor and a missing backticked path are reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text('<a id="kept"></a>\n## A heading\n')
    md = tmp_path / "docs" / "b.md"
    md.write_text("[ok](a.md#kept) [ok](a.md#a-heading) [gone](missing.md) [bad](a.md#nope) `docs/none.md` "
                  "`docs/{a,z}.md`\n```bash\ncat docs/in_a_command.md\n```\n")
    problems = broken_doc_references(md)
    assert len(problems) == 4, problems
    code = tmp_path / "m.py"
    code.write_text("# see docs/a.md#kept and docs/a.md#missing and docs/gone.md\n")
    assert len(broken_code_references([code])) == 2


def test_readme_commands_are_what_ci_runs():
    """The README's set-up and test commands, verbatim; CI runs the same test command; the extras and the entry
    point the set-up names exist."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)
    assert SETUP_COMMAND in [b.strip() for b in blocks], "README's set-up command changed"
    assert TEST_COMMAND in [b.strip() for b in blocks], "README's test command changed"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in [line.strip() for line in ci], ".ci/run must run the README's test command"
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib before Python 3.11
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    for extra in ("train", "dev"):
        assert re.search(rf"^{extra}\s*=", extras, flags=re.M), f"pyproject.toml has no [{extra}] extra"
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^pgpo-train\s*=", scripts, flags=re.M), "pyproject.toml has no pgpo-train script"


def test_readme_kernels_snippet_runs():
    """The Kernels API example, as printed, on the CPU (torch fallback): the weights keep each sequence's mass."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Kernels API", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md (Kernels API)", "exec"), scope)
    w, mask = scope["w"], scope["mask"]
    assert scope["token_advantages"].shape == mask.shape
    assert (w.sum(-1) - mask.sum(-1)).abs().max() < 1e-3
