"""Every command and code block in README.md and docs/*.md runs as written.

Fenced blocks are read by their info string, ``LANG [TAG ...]``:

- ``bash`` / ``sh``: each command (``\\`` continues a line, ``#`` lines are comments) runs
  in bash, in a scratch copy of the repository that the document's blocks share in order
  (a later block may use an earlier one's files); it must exit with 0, or with the code
  that a trailing comment ``# exit N`` announces.
- ``console``: the lines after ``$ `` are commands (run as above); the rest is output.
- ``python``: the block runs as a script there.
- ``toml``: a block whose first line is ``# NAME.toml`` is written to that file; every
  full config must load (``make_config``); with the tag ``fragment`` it must parse as TOML.
- ``text``, ``json``, or no language: shown, not run.

Tags that keep a block from running here, each checked as far as it can be:
``gpu`` (needs a GPU), ``site`` (a cluster's own modules or accounts), ``slurm`` (submits
to a Slurm, whose scripts tests/test_slurm.py runs for real), ``long`` (minutes to hours of
training), ``ci`` (the test suite itself: it must be what .ci/run runs), ``quickstart``
(run by its own test in a fresh venv). Their ``python -m dptrain`` commands are still
parsed, and their configs validated, exactly as the CLI would.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, child_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = {"gpu", "site", "slurm", "long", "ci", "quickstart"}
KNOWN_TAGS = NOT_RUN | {"fragment"}
SHOWN = {"", "text", "json", "markdown", "console-output", "ini"}
COMMAND_TIMEOUT = 600  # seconds: a hang guard for one documented command


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    tags: set[str] = field(default_factory=set)
    body: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of ``doc``, in order."""
    out, current = [], None
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        fence = re.match(r"^(\s*)```(.*)$", line)
        if fence and current is None:
            words = fence.group(2).split()
            current = Block(doc, n, words[0] if words else "", set(words[1:]))
        elif fence and current is not None:
            out.append(current)
            current = None
        elif current is not None:
            current.body += line + "\n"
    assert current is None, f"{doc}: a code block opened at line {current.line} never closes"
    return out


def commands(block: Block) -> list[str]:
    """The shell commands of a bash or console block."""
    lines = block.body.splitlines()
    if block.lang == "console":
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    out, pending = [], ""
    for ln in lines:
        stripped = ln.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append(pending + stripped)
        pending = ""
    return out


def expected_code(command: str) -> tuple[str, int]:
    m = re.search(r"\s+#\s*exit\s+(\d+)\s*$", command)
    return (command[:m.start()], int(m.group(1))) if m else (command, 0)


def dptrain_args(command: str) -> list[list[str]]:
    """The argument lists of every ``python -m dptrain`` in ``command``."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", command):
        words = shlex.split(part, comments=True)
        for i in range(len(words) - 2):
            if words[i].endswith(("python", "python3")) and words[i + 1:i + 3] == ["-m",
                                                                                  "dptrain"]:
                found.append(words[i + 3:])
    return found


def check_options(args: list[str], cwd: Path) -> None:
    """Parse ``args`` as the CLI would, and validate the config they make."""
    from dptrain import cli

    cmd = args[0] if args and args[0] in cli.COMMANDS else "train"
    rest = args[1:] if args and args[0] in cli.COMMANDS else args
    parser = {"train": cli.train_parser, "eval": cli.eval_parser,
              "inspect": cli.inspect_parser}.get(cmd)
    if parser is None:  # commands without a config to check
        return
    ns = parser().parse_args(rest)
    if cmd == "train":
        old = Path.cwd()
        os.chdir(cwd)
        try:
            cli.config_from_args(ns)
        finally:
            os.chdir(old)


def scratch(tmp_path: Path) -> Path:
    """A copy of the repository to run documented commands in (they may write runs/)."""
    dest = tmp_path / "repo"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))
    return dest


def env_for(root: Path) -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = str(root)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_block(block: Block, root: Path) -> None:
    env = env_for(root)
    if block.lang == "python":
        script = root / f"_doc_block_{block.line}.py"
        script.write_text(block.body)
        proc = subprocess.run([sys.executable, str(script)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{block.where}: {proc.stdout}\n{proc.stderr}"
        return
    for command in commands(block):
        command, code = expected_code(command)
        proc = subprocess.run(["bash", "-c", command], cwd=root, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == code, (f"{block.where}: `{command}` exited with "
                                         f"{proc.returncode}, not {code}\n{proc.stdout[-3000:]}"
                                         f"\n{proc.stderr[-3000:]}")


def check_toml(block: Block, root: Path) -> None:
    import tomllib

    from dptrain.config import load_toml, make_config

    if "fragment" in block.tags:  # a part of a config: it must still be TOML
        tomllib.loads(block.body)
        return
    first = block.body.splitlines()[0] if block.body.strip() else ""
    m = re.match(r"#\s*([\w.-]+\.toml)\b", first)
    path = root / (m.group(1) if m else f"_doc_block_{block.line}.toml")
    path.write_text(block.body)
    make_config(load_toml(path))


def test_every_block_is_of_a_known_kind():
    for doc in DOCS:
        for b in blocks(doc):
            assert b.lang in SHOWN | {"bash", "sh", "console", "python", "toml"}, b.where
            assert b.tags <= KNOWN_TAGS, f"{b.where}: unknown tags {b.tags - KNOWN_TAGS}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_documented_commands_and_code_run(doc, tmp_path):
    root = scratch(tmp_path)
    for b in blocks(doc):
        if b.lang in SHOWN:
            continue
        if b.lang == "toml":
            check_toml(b, root)
            continue
        if b.tags & NOT_RUN:
            for command in commands(b) if b.lang != "python" else []:
                for args in dptrain_args(expected_code(command)[0]):
                    check_options(args, root)
            continue
        run_block(b, root)


def test_the_ci_command_is_readmes():
    ci = (ROOT / ".ci" / "run").read_text()
    tagged = [c for b in blocks(ROOT / "README.md") if "ci" in b.tags for c in commands(b)]
    assert len(tagged) == 1 and tagged[0] in ci, tagged


@pytest.mark.slow
def test_quick_start_in_a_fresh_venv(tmp_path):
    """README's first command on a fresh copy: a venv, the install, 4 ranks of training."""
    [block] = [b for b in blocks(ROOT / "README.md") if "quickstart" in b.tags]
    [command] = commands(block)
    root = scratch(tmp_path)
    env = env_for(root)
    env.pop("PYTHONPATH")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if Path(p) != Path(sys.executable).parent)
    proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")][-1]
    assert float(re.search(r"test loss [0-9.]+ acc ([0-9.]+)", last).group(1)) > 0.9, last
    assert "4 rank(s)" in proc.stdout
