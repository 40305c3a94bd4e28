"""Every command line of README.md's ```bash blocks runs, in README order, and exits as documented.

Each line runs with bash in one temporary folder (lines build on each other: `plan ... -o
plan.json`, then `run ... --plan plan.json`), with a tiny model saved by ``save_pretrained`` as
``./my-model`` and ``./my-model-folder``, the HF cache, the config and the VRAMancer cache under
the temporary folder, HF offline: nothing is downloaded. ``vramancer`` means this interpreter's
``python -m vramancer``. A line exits 0 unless a comment on it documents another code
(``# exits 3``). Lines that cannot run here are skipped by ``SKIP`` below, each with its reason,
and reported as skipped; commands with ``--duration`` (monitor, dashboard, gui) run for one second.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINE_TIMEOUT_S = 300
DURATION_COMMANDS = ("monitor", "dashboard", "gui")     # they take --duration: run them for a second

# (pattern searched in the line, why it is not run here). Checked in order; the first match wins.
SKIP: tuple[tuple[str, str], ...] = (
    (r"^pip install\b", "installs packages from the network"),
    (r"\bpython -m pytest\b", "the test suite itself"),
    (r"^python benchmarks/", "a benchmark: minutes of measurements, never run as a test (README says so)"),
    (r"\bvramancer serve\b", "a long-running server with no --duration (tests/serve runs it for real)"),
    (r"\b(hf|huggingface-cli) download\b", "downloads from the Hugging Face Hub"),
    (r"\bvramancer (pull|plan|run|chat) [A-Za-z0-9][\w.-]*/[\w.-]+", "talks to the Hugging Face Hub "
     "(tests/hub runs pull / plan / run on a Hub id against a loopback Hub)"),
)


@dataclass(frozen=True)
class ReadmeLine:
    lineno: int
    command: str           # the shell text, continuation lines joined, comment-only lines dropped
    expected_exit: int

    @property
    def id(self) -> str:
        return f"README.md:{self.lineno}"


_EXITS = re.compile(r"#.*\bexits?\s+(?:with\s+)?(?:code\s+)?(\d+)")


def _strip_comment(line: str) -> str:
    """The line without its trailing ``# comment`` (a # inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_lines(text: str) -> list[ReadmeLine]:
    """The command lines of every ```bash block (``$ `` prompts dropped, ``\\`` continuations joined)."""
    out: list[ReadmeLine] = []
    in_bash = False
    pending: tuple[int, str, int] | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        fence = raw.strip()
        if fence.startswith("```"):
            in_bash = not in_bash and fence[3:].strip().lower() in ("bash", "sh", "shell", "console")
            pending = None
            continue
        if not in_bash:
            continue
        m = _EXITS.search(raw)
        code = int(m.group(1)) if m else 0
        body = _strip_comment(raw.strip().removeprefix("$ "))
        if pending is not None:
            start, sofar, code0 = pending
            body = sofar + " " + body
            code = code if m else code0
            lineno = start
        if body.endswith("\\"):
            pending = (lineno, body[:-1].rstrip(), code)
            continue
        pending = None
        if body:
            out.append(ReadmeLine(lineno, body, code))
    return out


def _needs(line: ReadmeLine) -> str | None:
    """Why ``line`` cannot run on this machine, or None."""
    for pattern, reason in SKIP:
        if re.search(pattern, line.command):
            return reason
    cuda = set(re.findall(r"\bcuda:(\d+)", line.command))
    if cuda:
        try:
            import torch

            have = torch.cuda.device_count()
        except ImportError:
            have = 0
        if have < len(cuda):
            return f"names {len(cuda)} CUDA GPU(s); this machine has {have}"
    if re.search(r"(^|[\s,])mps([\s,:]|$)", line.command):
        return "names an Apple GPU (mps)"
    for m in re.finditer(r"\bvramancer [a-z]+ ([^\s-]\S*)", line.command):    # the command's first argument
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@\S+)?", m.group(1)) and not m.group(1).startswith("."):
            return f"{m.group(1)} is a Hugging Face Hub id: it needs the network"
    return None


def _prepare(line: ReadmeLine) -> str:
    """The shell text actually run: long-running views get ``--duration 1`` and port 0."""
    command = line.command
    for name in DURATION_COMMANDS:
        if re.search(rf"\bvramancer {name}\b", command) and "--duration" not in command:
            command = re.sub(rf"(\bvramancer {name}\b)", r"\1 --duration 1", command)
            command = re.sub(r"--port \d+", "--port 0", command)   # never collide with a port in use
    return command


def _tiny_model(folder: Path) -> None:
    """A tiny Llama with a chat template (the demo's tokenizer), random weights, saved as safetensors."""
    from tests.models.tiny import chat_llama  # skips the test without torch / transformers

    model, tok = chat_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=32768, std=None)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


@dataclass(frozen=True)
class Outcome:
    skipped: str | None
    returncode: int | None = None
    output: str = ""


LINES = readme_lines(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, Outcome]:
    """Every README line run once, in README order, in one folder (later lines use earlier files)."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    _tiny_model(work / "my-model")
    shutil.copytree(work / "my-model", work / "my-model-folder")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vramancer"                      # `vramancer` = this interpreter's package
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m vramancer \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(root / "hf" / "hub"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "XDG_CONFIG_HOME": str(root / "config"), "XDG_CACHE_HOME": str(root / "cache"),
           "VRAMANCER_CACHE_DIR": str(root / "vramancer-cache"), "QT_QPA_PLATFORM": "offscreen",
           "COLUMNS": "120"}
    for name in ("VRAMANCER_CONFIG", "VRAMANCER_API_KEY", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    results: dict[int, Outcome] = {}
    for line in LINES:
        why = _needs(line)
        if why:
            results[line.lineno] = Outcome(skipped=why)
            continue
        try:
            p = subprocess.run([bash, "-c", _prepare(line)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=LINE_TIMEOUT_S)
            results[line.lineno] = Outcome(None, p.returncode, (p.stdout + p.stderr)[-3000:])
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            results[line.lineno] = Outcome(None, None, f"timed out after {LINE_TIMEOUT_S} s\n"
                                           + (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:])
    return results


def test_the_readme_has_command_lines():
    assert len(LINES) >= 10
    assert any(line.command.startswith("vramancer plan ") for line in LINES)


@pytest.mark.parametrize("line", LINES, ids=[line.id for line in LINES])
def test_readme_line(line: ReadmeLine, outcomes: dict[int, Outcome]):
    outcome = outcomes[line.lineno]
    if outcome.skipped:
        pytest.skip(f"{line.id}: {outcome.skipped}")
    assert outcome.returncode == line.expected_exit, (
        f"{line.id}: `{line.command}` exited {outcome.returncode}, the README says {line.expected_exit}\n"
        f"{outcome.output}")


def test_parser_reads_exit_codes_continuations_and_comments():
    text = ("intro\n```bash\nvramancer plan x --devices a,b   # exits 3 (does not fit)\n"
            "vramancer run ./m --prompt \"a # b\" \\\n    --json      # the JSON\n"
            "                 # a comment line\n\n$ vramancer devices\n```\n```python\nimport x\n```\n")
    lines = readme_lines(text)
    assert [(x.lineno, x.command, x.expected_exit) for x in lines] == [
        (3, "vramancer plan x --devices a,b", 3),
        (4, 'vramancer run ./m --prompt "a # b" --json', 0),
        (8, "vramancer devices", 0)]
    assert _prepare(ReadmeLine(1, "vramancer dashboard --port 8765", 0)) == "vramancer dashboard --duration 1 --port 0"
    assert _needs(ReadmeLine(1, "pip install -e '.[all]' && vramancer demo", 0)) == "installs packages from the network"
    assert "Hub id" in (_needs(ReadmeLine(1, "vramancer plan meta-llama/Llama-3.1-8B --devices rtx3090", 0)) or "")
    assert "Hub id" in (_needs(ReadmeLine(1, "vramancer pull Qwen/Qwen2.5-7B-Instruct --stages 1", 0)) or "")
    assert _needs(ReadmeLine(1, "vramancer convert ./my-model ./out --dtype bf16", 0)) is None
    assert _needs(ReadmeLine(1, "vramancer report trace.csv --plot mem.png", 0)) is None
