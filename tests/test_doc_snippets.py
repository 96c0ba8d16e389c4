"""Every code block of README.md, docs/*.md and the generated model cards runs as written.

Each document's blocks run in order in a fresh temporary folder (the current folder of the
block), as a reader would type them: ```` ```bash ````/``sh``/``shell`` blocks through
``bash -euo pipefail``, ``console`` blocks' ``$ `` lines the same way, ```` ```python ````
blocks through ``exec`` in one namespace per document (so a later block sees an earlier
block's names). Nothing is prepared or substituted: a block that needs a file makes it, or an
earlier block of the document does (``mmconvert example ckpt/`` comes first where ``ckpt/`` is
used), or the document says how with a marker right before the block:

* ``<!-- snippet: skip REASON -->``: the block is not run (the Hub, vLLM, CUDA, installs from
  the network); each skip is reported as a :class:`SnippetNote` warning with its reason, so
  the test run lists them;
* ``<!-- snippet: setup COMMAND -->``: COMMAND (bash) runs first, and is listed too.

Blocks in other languages (``json``, ``text``, none: synopses, layouts) are not code and are
not run. An unmarked block that fails fails its document's test, naming the file and line.

Not covered: ``docs/ci/`` holds a GitHub Actions workflow (YAML, not markdown), whose steps
install mmconvert from a git URL on a runner; ``tests/test_packaging.py`` checks that file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
BLOCK_TIMEOUT_S = 300
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>skip|setup)\b\s*(?P<text>.*?)\s*-->\s*$")

pytestmark = [pytest.mark.slow, pytest.mark.llama]


class SnippetNote(UserWarning):
    """A documented block that the test does not run and why, or a setup command it ran first."""


@dataclass
class Block:
    source: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in SHELL | PYTHON


def extract_blocks(markdown: str, source: str) -> list[Block]:
    """The fenced blocks of ``markdown`` with the snippet markers that precede each (blank
    lines may separate a marker from its block; any other line drops it)."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    skip: str | None = None
    setup: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker:
            if marker["kind"] == "skip":
                skip = marker["text"] or ""
            else:
                setup.append(marker["text"])
        elif fence:
            indent, mark, start = fence["indent"], fence["fence"], i + 1
            body: list[str] = []
            i += 1
            while i < len(lines) and not (lines[i].strip().startswith(mark)
                                          and lines[i].strip().strip(mark[0]) == ""):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            blocks.append(Block(source, start, fence["lang"].lower(), "\n".join(body) + "\n",
                                skip, setup))
            skip, setup = None, []
        elif line.strip():
            skip, setup = None, []
        i += 1
    return blocks


def _shell_text(block: Block) -> str:
    if block.lang != "console":
        return block.text
    return "\n".join(line[2:] for line in block.text.splitlines() if line.startswith("$ "))


def _env() -> dict[str, str]:
    """The environment of this interpreter: its ``python``, ``mmconvert`` and ``hf`` first."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run_shell(script: str, cwd: Path, where: str) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{where}: exit {proc.returncode}\n--- block ---\n{script}\n--- stdout ---\n"
                    f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}",
                    pytrace=False)


def run_blocks(blocks: list[Block], cwd: Path) -> tuple[list[str], list[str]]:
    """Run ``blocks`` in order in ``cwd``; returns (ran, skipped) as ``file:line`` lists."""
    ran: list[str] = []
    skipped: list[str] = []
    namespace: dict = {"__name__": "__main__"}
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        for block in blocks:
            if not block.runnable:
                continue
            if block.skip is not None:
                assert block.skip, f"{block.where}: a skip marker needs a reason"
                warnings.warn(f"{block.where} ({block.lang}) not run: {block.skip}",
                              SnippetNote, stacklevel=1)
                skipped.append(f"{block.where}: {block.skip}")
                continue
            for command in block.setup:
                warnings.warn(f"{block.where}: setup `{command}`", SnippetNote, stacklevel=1)
                _run_shell(command, cwd, f"{block.where} (setup)")
            if block.lang in SHELL:
                _run_shell(_shell_text(block), cwd, block.where)
            else:
                try:
                    exec(compile(block.text, block.where, "exec"), namespace)
                except Exception as exc:
                    pytest.fail(f"{block.where}: {type(exc).__name__}: {exc}\n--- block ---\n"
                                f"{block.text}", pytrace=False)
            ran.append(block.where)
    finally:
        os.chdir(old_cwd)
    return ran, skipped


# ---------------------------------------------------------------------------------------------
# the extractor itself


def test_extractor_reads_languages_markers_and_lines():
    doc = ("# T\n\n```bash\necho one\n```\n\n<!-- snippet: skip needs the Hub -->\n\n"
           "```python\nprint(2)\n```\n<!-- snippet: setup touch x -->\n```sh\ncat x\n```\n"
           "<!-- snippet: skip dropped by the next line -->\ntext\n```\nsynopsis\n```\n"
           "1. step\n\n   ```console\n   $ echo three\n   three\n   ```\n")
    blocks = extract_blocks(doc, "t.md")
    assert [(b.lang, b.line, b.skip, b.setup) for b in blocks] == [
        ("bash", 3, None, []), ("python", 9, "needs the Hub", []), ("sh", 13, None, ["touch x"]),
        ("", 18, None, []), ("console", 23, None, [])]
    assert blocks[0].text == "echo one\n" and blocks[4].text == "$ echo three\nthree\n"
    assert _shell_text(blocks[4]) == "echo three"
    assert [b.runnable for b in blocks] == [True, True, True, False, True]


def test_a_failing_unmarked_block_fails_and_a_marked_one_is_listed(tmp_path):
    blocks = extract_blocks("<!-- snippet: skip not here -->\n```bash\nexit 3\n```\n"
                            "```python\nopen('made.txt', 'w').write('x')\n```\n", "t.md")
    with pytest.warns(SnippetNote, match="t.md:2 .*not here"):
        ran, skipped = run_blocks(blocks, tmp_path)
    assert ran == ["t.md:5"] and skipped == ["t.md:2: not here"]
    assert (tmp_path / "made.txt").read_text() == "x"
    with pytest.raises(pytest.fail.Exception, match="t.md:1: exit 3"):
        run_blocks(extract_blocks("```sh\nexit 3\n```\n", "t.md"), tmp_path)


# ---------------------------------------------------------------------------------------------
# the documents and the cards


@pytest.mark.parametrize("doc", DOCS)
def test_doc_snippets_run_as_written(doc, tmp_path):
    blocks = extract_blocks((ROOT / doc).read_text(encoding="utf-8"), doc)
    ran, skipped = run_blocks(blocks, tmp_path)
    print(f"{doc}: ran {len(ran)} block(s), skipped {len(skipped)}", *skipped, sep="\n  ")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """The example checkpoint and its three bundles, made as the README's quick start makes
    them; each bundle's README.md is the card its snippets come from."""
    work = tmp_path_factory.mktemp("cards")
    _run_shell("mmconvert example ckpt/\n"
               "mmconvert to-gguf ckpt/ -o gguf/ --outtype q8_0\n"
               "mmconvert to-hf ckpt/ -o hf/\n"
               "mmconvert to-safetensors ckpt/ -o st/\n", work, "card bundles")
    return work


@pytest.mark.parametrize("bundle", ["gguf", "hf", "st"])
def test_card_snippets_run_as_written(bundle, bundles):
    """The card names the bundle by its folder, so its blocks run beside it."""
    card = (bundles / bundle / "README.md").read_text(encoding="utf-8")
    blocks = extract_blocks(card, f"{bundle}/README.md")
    assert sum(b.runnable and b.skip is None for b in blocks) >= 2, card
    ran, skipped = run_blocks(blocks, bundles)
    print(f"{bundle} card: ran {len(ran)} block(s), skipped {len(skipped)}", *skipped,
          sep="\n  ")
