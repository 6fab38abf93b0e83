"""The commands and configs README.md and docs/ show work as written: every flag is one its program accepts,
every ``--set`` override (with the ``--config`` it goes with) and every ``yaml`` snippet passes the config's
validation.

Commands are read from fenced blocks (``bash`` or unmarked) and from inline code that runs ``python``. A
flag is checked against the program's own ``--help``; ``sbatch`` scripts hand their arguments to
launcher/train.py.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from peft_dist.train.config import load_config
from tests.multiproc import REPO

pytestmark = pytest.mark.slow  # each program's --help imports torch in a process of its own

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_OURS = {"pytest", "venv", "pip", "mlflow"}  # programs whose flags are someone else's
PLACEHOLDER = re.compile(r"<|\.\.\.|\bDIR\b|\bRUN\b|\$")
PROGRAM = r"(?:\S*/)?python3?|deepspeed|torchrun|sbatch"


def documented_commands(text: str) -> list[str]:
    """Each command line of the fenced blocks (bash or unmarked; continuations joined) and each inline
    ``python ...``: a line that starts with a program, after any VAR=value."""
    lines, fence = [], None  # fence: the language of the block we are in
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip("` ") if fence is None else None
        elif fence in ("", "bash", "sh"):
            lines.append(line)
    lines += re.findall(r"(?<!`)`((?:\S*/)?python3? [^`\n]*)`(?!`)", text)
    return [line.strip() for line in lines if re.match(rf"\s*(?:[A-Z_]+=\S*\s+)*(?:{PROGRAM})\s", line + " ")]


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of each of our programs a command line runs; program is a path under the
    repository (launcher/train.py, bench/x.py, slurm/x.sbatch) or ``-m module``."""
    out = []
    for part in re.split(r"&&|\|", line):
        words = shlex.split(part, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if not words or not re.fullmatch(PROGRAM, words[0]):
            continue
        if words[0] in ("deepspeed", "torchrun", "sbatch"):  # launcher options, then the script
            script = next((i for i, w in enumerate(words) if w.endswith((".py", ".sbatch"))), None)
            if script is not None:
                out.append((words[script], words[script + 1:]))
        elif words[1:2] == ["-m"] and len(words) > 2 and words[2].split(".")[0] not in NOT_OURS:
            out.append(("-m " + words[2], words[3:]))
        elif len(words) > 1 and words[1].endswith(".py"):
            out.append((words[1], words[2:]))
    return out


# (where, program, arguments) of every documented command, read once for all the tests below
INVOCATIONS = [(f"{doc.name}: {line.strip()}", program, args) for doc in DOCS
               for line in documented_commands(doc.read_text()) for program, args in invocations(line)]


def help_text(program: str) -> str:
    argv = program.split() if program.startswith("-m ") else [str(REPO / program)]
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, f"{program} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def target(program: str) -> str:
    """The Python program that reads the arguments (sbatch scripts: the trainer)."""
    return "launcher/train.py" if program.endswith(".sbatch") else program


PROGRAMS = sorted({target(program) for _, program, _ in INVOCATIONS})


def test_the_docs_show_commands_of_every_kind():
    assert {"launcher/train.py", "-m peft_dist.plan", "-m peft_dist.export", "-m peft_dist.generate",
            "bench/seven_b_peft.py"} <= set(PROGRAMS), PROGRAMS


@pytest.mark.parametrize("program", PROGRAMS)
def test_documented_commands_use_flags_their_program_has(program):
    """One test per program, so that each program's --help runs once."""
    known = set(re.findall(r"--[\w-]+", help_text(program)))
    wrong = []
    for where, used, args in INVOCATIONS:
        if target(used) != program:
            continue
        if not used.startswith("-m ") and not (REPO / used).is_file():
            wrong.append(f"{where}: no file {used}")
        unknown = sorted({arg.split("=")[0] for arg in args if arg.startswith("--")} - known)
        if unknown:
            wrong.append(f"{where}: {unknown} not among {program}'s flags")
    assert not wrong, "\n".join(wrong)


TRAINER_RUNS = [pytest.param(program, args, id=where) for where, program, args in INVOCATIONS
                if target(program) == "launcher/train.py" and not any(PLACEHOLDER.search(a) for a in args)]


@pytest.mark.parametrize("program, args", TRAINER_RUNS)
def test_a_documented_training_command_passes_config_validation(program, args):
    config = args[args.index("--config") + 1] if "--config" in args else None
    if program.startswith("slurm/presets/"):  # the preset's own config
        config = program.removesuffix(".sbatch") + ".yaml"
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    load_config(REPO / config if config else None, overrides)  # raises ConfigError naming the key


CONFIG_SNIPPETS = [pytest.param(snippet, id=f"{doc.name}: {snippet.splitlines()[0]}") for doc in DOCS
                   for snippet in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)]


@pytest.mark.parametrize("snippet", CONFIG_SNIPPETS)
def test_a_documented_config_snippet_passes_validation(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # snippets name files as from the repository root
    (tmp_path / "snippet.yaml").write_text(snippet)
    load_config(tmp_path / "snippet.yaml")
