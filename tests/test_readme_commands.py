"""Every README command block marked runnable runs as written, in order, on a tiny toy world.

The README marks such a block with `<!-- runnable ... -->` on the line before its ```bash fence.
Each line is run in a fresh temporary directory (the user's checkout) through the real `repae`
argument parser, with the tiny toy world's overrides appended where a command takes key=value
overrides and names no training run (a run brings its own config), so a renamed flag, a changed
default output path or a command that no longer runs fails here. A trailing `# error: TEXT` says
the command must fail with TEXT in its one-line error; `# prints A, B, ...; remark` that it prints
each of A, B (`...` stands for anything; what follows `;` is a remark). Afterwards the checkout holds nothing but `runs/`,
the folder .gitignore ignores.

Commands run in this process (`repae.cli.main`), not as `python -m repae.cli` subprocesses: the
~3 s import of torch per command would make this test minutes long; `-m slow` runs every command
as its own process as well.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

from repae.cli import main
from test_train_loop import TINY

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runnable"

# Budgets the README shows at full size, and what each becomes here (the README's value is otherwise kept).
SCALE = {"train.max_steps=4000": "train.max_steps=4", "50000": "10"}
TINY_RUN = [*TINY, "train.max_steps=2"]
TAKES_OVERRIDES = ("train", "train-ldm", "cache-latents", "sample", "evaluate")


class Command(NamedTuple):
    argv: List[str]             # after `repae`
    stdout: Optional[str]       # `> FILE`
    error: Optional[str]        # `# error: TEXT`
    prints: List[str]           # `# prints A, B, ...`
    line: str


def runnable_blocks(text: str) -> List[List[str]]:
    """The lines of each fenced block whose preceding line is the runnable marker, in README order."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip().startswith(MARK):
            assert lines[i + 1].startswith("```"), f"README line {i + 2}: the runnable marker must precede a fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append(lines[i + 2:end])
    return blocks


def _joined(block: List[str]) -> List[str]:
    """Continuation lines (trailing backslash) joined; blank and comment-only lines dropped."""
    out, current = [], ""
    for line in block:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def parse(line: str) -> List[Command]:
    """One README line -> the repae commands it runs (`mkdir -p` is done here, `&&` chains)."""
    code, _, comment = line.partition(" #")
    comment = comment.strip()
    error = comment[len("error:"):].strip() if comment.startswith("error:") else None
    shown = comment[len("prints"):].split(";")[0]  # `# prints A, B; a remark`
    prints = [p.strip() for p in shown.split(",")] if comment.startswith("prints ") else []
    commands = []
    for part in code.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["mkdir", "-p"]:
            for d in words[2:]:
                Path(d).mkdir(parents=True, exist_ok=True)
            continue
        stdout = None
        if ">" in words:
            k = words.index(">")
            words, stdout = words[:k], words[k + 1]
        if words[0] == "torchrun":  # the same command line in one process
            assert words[words.index("-m") + 1] == "repae.cli", line
            words = ["repae", *words[words.index("-m") + 2:]]
        assert words[0] == "repae", f"a runnable README block runs repae commands only: {line!r}"
        argv = [SCALE.get(w, w) for w in words[1:]]
        commands.append(Command(argv, stdout, error, [p for p in prints if p != "..."], line))
    return commands


def _names_a_run(argv: List[str]) -> bool:
    return any(Path(a).is_dir() and (Path(a) / "config.yaml").is_file() for a in argv)


def tiny(argv: List[str]) -> List[str]:
    """The command's own arguments, then the tiny toy world's overrides for keys it does not set."""
    if argv[0] not in TAKES_OVERRIDES or _names_a_run(argv):
        return argv
    given = {a.split("=", 1)[0] for a in argv if "=" in a and not a.startswith("-")}
    return [*argv, *(o for o in TINY_RUN if o.split("=", 1)[0] not in given)]


def _matches(pattern: str, text: str) -> bool:
    return re.search(".*?".join(map(re.escape, pattern.split("..."))), text) is not None


def run_in_process(cmd: Command) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(tiny(cmd.argv))
        except SystemExit as exc:  # argparse: an unknown flag, a missing argument
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # a crash: reported with the README line that caused it
            code = 1
            traceback.print_exc(file=err)
    return code, out.getvalue(), err.getvalue()


def run_as_process(cmd: Command) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "repae.cli", *tiny(cmd.argv)], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def check(cmd: Command, code: int, out: str, err: str) -> None:
    said = f"README: {cmd.line}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    if cmd.error is not None:
        assert code == 2, said
        assert _matches(cmd.error, err) and "Traceback" not in err, said
        return
    assert code == 0, said
    for text in cmd.prints:
        assert _matches(text, out), f"does not print {text!r}\n{said}"
    if cmd.stdout:
        Path(cmd.stdout).write_text(out)
    if cmd.argv[0] == "evaluate":  # "Each `repae evaluate` command prints a JSON record and writes it"
        assert json.loads(out)["evaluation"] == cmd.argv[1], said


def readme_commands() -> List[str]:
    return [line for block in runnable_blocks((ROOT / "README.md").read_text()) for line in _joined(block)]


def run_all(tmp_path, monkeypatch, runner) -> None:
    home = tmp_path / "checkout"
    home.mkdir()
    monkeypatch.chdir(home)
    monkeypatch.setenv("REPAE_CACHE", str(tmp_path / "cache"))  # the tiny toy world, built once
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for line in readme_commands():
        for cmd in parse(line):
            check(cmd, *runner(cmd))
    run = home / "runs" / "toy"  # what the README says `repae train` leaves
    for name in ("checkpoints", "samples", "metrics.jsonl", "loss_curves.png", "summary.json"):
        assert (run / name).exists(), name
    assert sorted(p.name.split("-step")[0] for p in (run / "eval").iterdir()) == ["cknna", "latents", "samples", "spectrum", "vae"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4  # `train.max_steps=...` resumed and continued
    assert sorted(p.name for p in home.iterdir()) == ["runs"]  # nothing left outside the ignored folder
    assert "runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_readme_marks_its_toy_world_blocks():
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 4
    firsts = [parse(_joined(b)[0])[0].argv[0] for b in blocks]
    assert firsts[0] == "train" and {"evaluate", "export-vae", "config"} <= set(firsts)


def test_every_runnable_readme_command_runs_as_written(tmp_path, monkeypatch):
    run_all(tmp_path, monkeypatch, run_in_process)


@pytest.mark.slow  # one process per command: ~3 s of imports each
def test_every_runnable_readme_command_runs_as_its_own_process(tmp_path, monkeypatch):
    run_all(tmp_path, monkeypatch, run_as_process)
