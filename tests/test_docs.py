"""
README.md and docs/*.md stay true: every command shown parses as written, every relative link resolves, the README
stays a short landing page and each docs page opens with the question it answers and the command that reproduces it.

Commands are checked without running them: `prism-hf ...` (also `python -m prism_hf.cli ...` and under `accelerate
launch`) and `python benchmarks/run.py ...` through `prism_hf.cli.build_parser()`, other `python benchmarks/*.py` and
`python examples/*.py` scripts by the flags their argparse parsers declare (read from the source), `python -m pytest`
by the test files it names.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 220
# paths in commands that must exist in the checkout (output folders excepted)
REPO_PATH_PREFIXES = ("hub_models/", "benchmarks/", "examples/", "tests/", "docs/")
OUTPUT_FLAGS = {"--output-dir", "--feature-cache-dir", "--drafts-dir"}
# a landing page keeps current facts: how a number changed belongs to the git log and the results folders
HISTORY_WORDS = re.compile(r"\b(earlier|rerun|re-run|previous session|was|no longer)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str  # one command of a logical line (`&&` / `;` / `|` chains split)
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}: `{self.text}`"


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


@cache
def _lines(page: Path) -> tuple[str, ...]:
    return tuple(page.read_text(encoding="utf-8").splitlines())


def fenced_blocks(page: Path) -> list[Block]:
    blocks, opened, language, body = [], None, "", []
    for number, line in enumerate(_lines(page), start=1):
        if line.lstrip().startswith("```"):
            if opened is None:
                opened, language, body = number, line.lstrip()[3:].strip(), []
            else:
                blocks.append(Block(page, opened, language, "\n".join(body)))
                opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{_rel(page)}:{opened}: a code fence is never closed"
    return blocks


def prose(page: Path) -> str:
    """The page without its fenced code blocks (each replaced by blank lines, so line numbers stay)."""
    out, inside = [], False
    for line in _lines(page):
        fence = line.lstrip().startswith("```")
        out.append("" if inside or fence else line)
        if fence:
            inside = not inside
    return "\n".join(out)


def _marker_lines(page: Path, name: str) -> range:
    lines = _lines(page)
    try:
        start = lines.index(f"<!-- {name} -->")
        end = lines.index(f"<!-- /{name} -->")
    except ValueError:
        return range(0)
    return range(start + 1, end + 2)


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """`\\`-continued lines joined, with the line number where each starts."""
    result, pending, start = [], "", None
    for offset, line in enumerate(block.text.splitlines(), start=1):
        if start is None:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        result.append((start, pending + line))
        pending, start = "", None
    if pending:
        result.append((start, pending))
    return result


def _split_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _without_environment(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    return argv


def commands() -> list[Command]:
    found = []
    for page in PAGES:
        skipped = _marker_lines(page, "test-command") if page == README else range(0)
        for block in fenced_blocks(page):
            if block.language not in ("bash", "sh", "shell"):
                continue
            for number, line in _logical_lines(block):
                if number in skipped:  # the README's test command: CI runs it as it is
                    continue
                for argv in _split_commands(line):
                    argv = _without_environment(argv)
                    if argv:
                        found.append(Command(page, number, shlex.join(argv), tuple(argv)))
    return found


COMMANDS = commands()


def _kind(argv: tuple[str, ...]) -> str:
    if argv[0] == "pip" or argv[:3] == ("python", "-m", "pip"):
        return "pip"
    if argv[0] == "prism-hf" or argv[:3] == ("python", "-m", "prism_hf.cli"):
        return "prism-hf"
    if argv[0] == "accelerate" and "prism_hf.cli" in argv:
        return "prism-hf"
    if argv[:3] == ("python", "-m", "pytest"):
        return "pytest"
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith(("benchmarks/", "examples/")):
        return "script"
    return "unknown"


def _cli_arguments(argv: tuple[str, ...]) -> list[str]:
    if argv[0] == "prism-hf":
        return list(argv[1:])
    index = argv.index("prism_hf.cli")
    assert argv[index - 1] == "-m", f"`{shlex.join(argv)}`: expected `-m prism_hf.cli`"
    return list(argv[index + 1 :])


@cache
def _parser():
    from prism_hf.cli import build_parser

    return build_parser()


@cache
def _run_presets() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("_docs_benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines PRESETS; runs nothing outside `__main__`
    return module.PRESETS


def _parse_cli(command: Command, arguments: list[str]) -> None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(arguments)
    except SystemExit as exit_:
        error = stderr.getvalue().strip().splitlines()
        pytest.fail(f"{command} does not parse (exit {exit_.code}): {error[-1] if error else ''}")


@cache
def _declared_flags(script: Path) -> frozenset[str]:
    """The option strings of every `add_argument(...)` call in the script."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(
                arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")
            )
    return frozenset(flags)


def _check_repo_paths(command: Command) -> None:
    argv = command.argv
    for index, token in enumerate(argv):
        if index > 0 and argv[index - 1] in OUTPUT_FLAGS:
            continue
        value = token.split("=", 1)[1] if "=" in token and not token.startswith("-") else token
        if value.startswith(REPO_PATH_PREFIXES):
            path = REPO / value.split("::")[0]
            assert path.exists(), f"{command}: {value} does not exist"


def test_commands_were_found():
    kinds = {_kind(c.argv) for c in COMMANDS}
    assert {"prism-hf", "script"} <= kinds, f"no prism-hf or script commands found in {[_rel(p) for p in PAGES]}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_runs_as_written(command):
    kind = _kind(command.argv)
    argv = command.argv
    if kind == "pip":
        return
    if kind == "unknown":
        pytest.fail(f"{command}: no check knows this command; show only commands tests/test_docs.py can check")
    _check_repo_paths(command)
    if kind == "prism-hf":
        _parse_cli(command, _cli_arguments(argv))
    elif kind == "pytest":
        tests = [a for a in argv[3:] if not a.startswith("-")]
        for test in tests:
            assert (REPO / test.split("::")[0]).is_file(), f"{command}: {test} does not exist"
    else:
        script = REPO / argv[1]
        assert script.is_file(), f"{command}: {argv[1]} does not exist"
        arguments = list(argv[2:])
        if script == REPO / "benchmarks" / "run.py":
            presets = _run_presets()
            if arguments and not arguments[0].startswith("-"):
                assert arguments[0] in presets, f"{command}: no preset {arguments[0]!r} in benchmarks/run.py"
                arguments = presets[arguments[0]] + arguments[1:]
            _parse_cli(command, ["bench", *arguments])
            return
        declared = _declared_flags(script)
        used = {a.split("=", 1)[0] for a in arguments if a.startswith("--")}
        unknown = sorted(used - declared)
        assert not unknown, f"{command}: {argv[1]} declares no {', '.join(unknown)} (it has {sorted(declared)})"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@cache
def _anchors(page: Path) -> frozenset[str]:
    anchors, seen = set(), {}
    for line in prose(page).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(anchors)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(prose(page).splitlines(), start=1):
        line = re.sub(r"`[^`]*`", "", line)  # inline code shows text, not links
        found += [(number, target) for target in LINK.findall(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for number, target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto, ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{_rel(page)}:{number}: {target} (no such file or folder)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{_rel(page)}:{number}: {target} (no heading #{anchor} in {path.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_landing_page():
    lines = _lines(README)
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"
    history = [f"README.md:{n}: {line.strip()}" for n, line in enumerate(prose(README).splitlines(), 1)
               if HISTORY_WORDS.search(line)]  # fmt: skip
    assert not history, "the README states current facts only:\n" + "\n".join(history)


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in _links(README)}
    missing = [_rel(page) for page in DOCS if page.resolve() not in linked]
    assert DOCS, "docs/ has no pages"
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("name", ["demo-command", "test-command"])
def test_readme_keeps_its_command_markers(name):
    inside = _marker_lines(README, name)
    assert inside, f"README.md lacks <!-- {name} --> ... <!-- /{name} -->"
    blocks = [b for b in fenced_blocks(README) if b.line in inside]
    assert len(blocks) == 1 and blocks[0].language == "bash" and blocks[0].text.strip(), (
        f"README.md: <!-- {name} --> must hold one ```bash block with the command (CI reads it)"
    )


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_docs_page_opens_with_its_question_and_command(page):
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", page.read_text(encoding="utf-8")) if p.strip()]
    body = [p for p in paragraphs if not p.startswith("#")]
    assert body, f"{_rel(page)} has no text"
    question = body[0]
    assert "\n" not in question and not question.startswith(("```", "|", "-", "*", "<", "!", ">")), (
        f"{_rel(page)}: the first paragraph after the title must be the one-line question the page answers, "
        f"got {question[:80]!r}"
    )
    assert question.endswith("?"), f"{_rel(page)}: the opening line should state the question, got {question!r}"
    assert len(body) > 1 and body[1].startswith("```bash"), (
        f"{_rel(page)}: the question must be followed by the command that reproduces the page (a ```bash block)"
    )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_snippets_compile(page):
    for block in fenced_blocks(page):
        if block.language == "python":
            try:
                compile(block.text, f"{_rel(page)}:{block.line}", "exec")
            except SyntaxError as error:
                pytest.fail(f"{_rel(page)}:{block.line + (error.lineno or 0)}: {error.msg}")
