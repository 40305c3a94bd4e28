"""What a new user meets first: --version, -v/-q, short flags, the config file, shell completion,
"did you mean", output that fits a pipe (full names, no colour, JSON), run's prompt from stdin,
control bytes escaped, Ctrl-C, and --plan conflicts."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vramancer.cli import build_parser
from vramancer.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "HF_HUB_OFFLINE": "1", "VRAMANCER_CACHE_DIR": str(tmp_path / "cache")}
    for name in ("VRAMANCER_CONFIG", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):
        env.pop(name, None)
    return {**env, **extra}


def _vramancer(tmp_path: Path, *argv: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramancer", *argv], capture_output=True, text=True,
                          timeout=timeout, env=_env(tmp_path, **env), cwd=tmp_path)


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """The user's own config file never leaks into these tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("VRAMANCER_CONFIG", raising=False)
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))


# -- --version, -v, -q ---------------------------------------------------------------------------

def test_version_lines_and_plan_never_imports_torch(tmp_path):
    from vramancer import __version__
    from vramancer.devices.nvml import default_backend

    p = _vramancer(tmp_path, "--version")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"vramancer {__version__}"
    assert lines[1] == f"python {sys.version.split()[0]}"
    torch = pytest.importorskip("torch")
    assert lines[2] == f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'})"
    assert lines[3].startswith("CUDA driver ") and lines[4].startswith("NVIDIA driver ")
    if not default_backend().available():
        assert lines[3:] == ["CUDA driver none", "NVIDIA driver none"]
    code = ("import sys; from vramancer.cli import main; rc = main(['plan', 'llama-3.1-8b', '-d', 'rtx3090']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'plan imported torch'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path), cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr


def test_driver_versions_through_nvml():
    from vramancer.about import driver_versions
    from vramancer.devices.nvml import NvmlBackend

    fake_nvml = pytest.importorskip("tests.telemetry.fake_nvml")
    fake = fake_nvml.three_gpus()
    fake.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
    assert driver_versions(NvmlBackend(module=fake)) == ("12.4", "550.54.15")
    assert driver_versions(NvmlBackend(module=fake_nvml.no_library())) == ("none", "none")


@pytest.mark.parametrize("flags, level", [([], logging.WARNING), (["-v"], logging.INFO),
                                          (["-vv"], logging.DEBUG), (["-q"], logging.ERROR)])
def test_verbose_and_quiet_set_the_log_level(capsys, flags, level):
    assert cli([*flags, "plan", "llama-3.1-8b", "-d", "rtx3090"]) == 0
    assert logging.getLogger("vramancer").level == level
    assert cli(["plan", "llama-3.1-8b", "-d", "rtx3090", *flags]) == 0   # after the command too
    assert logging.getLogger("vramancer").level == level


# -- short flags --------------------------------------------------------------------------------

SHORT = {"--prompt": "-p", "--max-new-tokens": "-n", "--context": "-c", "--devices": "-d"}


def test_short_flags_on_every_command_that_has_the_long_one():
    from vramancer.completion import describe

    seen = set()
    for command in describe(build_parser())[1:]:
        for option in command.options:
            for long, short in SHORT.items():
                if long in option.strings:
                    assert short in option.strings, f"{command.name} {long} has no {short}"
                    seen.add((command.name, long))
    assert {("run", "--prompt"), ("run", "--max-new-tokens"), ("chat", "--max-new-tokens"), ("plan", "--context"),
            ("serve", "--devices"), ("devices", "--devices"), ("monitor", "--devices")} <= seen


def test_short_flags_mean_the_long_ones(capsys):
    assert cli(["plan", "llama-3.1-8b", "-d", "rtx3090,rtx3060", "-c", "2048", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["workload"]["context"] == 2048
    assert sorted(s["device"] for s in d["stages"]) == ["rtx3060-12gb#0", "rtx3090#0"]


# -- the config file ----------------------------------------------------------------------------

def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "vramancer" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_file_sets_defaults_and_flags_win(tmp_path, capsys):
    _write_config(tmp_path, 'devices = "rtx3090,rtx3060"\ncontext = 8192\nreserve = "1GiB"\ndtype = "float16"\n')
    assert cli(["plan", "llama-3.1-8b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert sorted(s["device"] for s in d["stages"]) == ["rtx3060-12gb#0", "rtx3090#0"]
    assert d["workload"]["context"] == 8192 and d["workload"]["dtype"] == "float16"
    assert all(s["reserve_bytes"] == 2**30 for s in d["stages"])
    assert cli(["plan", "llama-3.1-8b", "--json", "-d", "rtx4090", "--context", "1024"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["device"] for s in d["stages"]] == ["rtx4090#0"] and d["workload"]["context"] == 1024
    assert cli(["devices", "--json"]) == 0                       # devices: the configured ones too
    assert [x["id"] for x in json.loads(capsys.readouterr().out)["devices"]] == ["rtx3090#0", "rtx3060-12gb#0"]


def test_config_path_follows_env(tmp_path, monkeypatch):
    from vramancer.config import config_path, load_config

    assert config_path() == tmp_path / "config" / "vramancer" / "config.toml"
    other = tmp_path / "elsewhere.toml"
    other.write_text("context = 512\n")
    monkeypatch.setenv("VRAMANCER_CONFIG", str(other))
    assert config_path() == other and load_config().context == 512 and load_config().devices is None
    monkeypatch.delenv("VRAMANCER_CONFIG")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_path() == tmp_path / "home" / ".config" / "vramancer" / "config.toml"
    assert load_config().defaults() == {}                        # no file: no config


@pytest.mark.parametrize("text, says", [
    ('devices = "rtx3090\n', "not valid TOML"),
    ('gpus = "rtx3090"\n', "unknown key 'gpus'"),
    ('context = "big"\n', "context must be an integer"),
    ("devices = 3090\n", "devices must be a string"),
    ("context = 0\n", "context must be at least 1"),
])
def test_malformed_config_is_one_line_exit_2(tmp_path, text, says):
    path = _write_config(tmp_path, text)
    p = _vramancer(tmp_path, "plan", "llama-3.1-8b")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vramancer: error: config file {path}") and says in lines[0]
    assert _vramancer(tmp_path, "--version").returncode == 0   # commands the config does not touch still work


# -- completion ---------------------------------------------------------------------------------

def _bash_complete(tmp_path: Path, script: str, words: list[str]) -> list[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (tmp_path / "c.bash").write_text(script)
    words_text = " ".join(f"'{w}'" for w in words)
    cmd = (f"source {tmp_path / 'c.bash'}; COMP_WORDS=({words_text}); COMP_CWORD={len(words) - 1}; "
           "_vramancer; printf '%s\\n' \"${COMPREPLY[@]}\"")
    p = subprocess.run([bash, "-c", cmd], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


def test_bash_completion_completes_commands_flags_and_choices(tmp_path):
    p = _vramancer(tmp_path, "completion", "bash")
    assert p.returncode == 0, p.stderr
    script = p.stdout
    assert _bash_complete(tmp_path, script, ["vramancer", "pl"]) == ["plan"]
    assert _bash_complete(tmp_path, script, ["vramancer", "plan", "--obj"]) == ["--objective"]
    assert _bash_complete(tmp_path, script, ["vramancer", "plan", "--objective", ""]) == ["latency", "throughput"]
    assert "--top-p" in _bash_complete(tmp_path, script, ["vramancer", "run", "--to"])
    assert "llama-3.1-70b" in _bash_complete(tmp_path, script, ["vramancer", "plan", "llama-3.1-7"])
    assert {"bash", "fish", "zsh"} <= set(_bash_complete(tmp_path, script, ["vramancer", "completion", ""]))
    assert _bash_complete(tmp_path, script, ["vramancer", "run", "c."]) == ["c.bash"]    # MODEL: files


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_name_every_command_and_flag(tmp_path, shell):
    from vramancer.completion import describe

    p = _vramancer(tmp_path, "completion", shell)
    assert p.returncode == 0, p.stderr
    for command in describe(build_parser())[1:]:
        assert command.name in p.stdout
        for option in command.options:
            for s in option.strings:
                assert (s if shell == "zsh" else (f"-l {s[2:]}" if s.startswith("--") else f"-s {s[1:]}")) in p.stdout
    exe = shutil.which(shell)
    if exe and shell == "fish":   # fish completes for real: what a person gets on Tab
        (tmp_path / "v.fish").write_text(p.stdout)
        q = subprocess.run([exe, "--no-config", "-c", f"source {tmp_path / 'v.fish'}; complete -C 'vramancer pl'; "
                            "echo ---; complete -C 'vramancer plan --objective '; echo ---; "
                            "complete -C 'vramancer run --top'"], capture_output=True, text=True, timeout=30)
        first, choices, top = q.stdout.split("---\n")
        assert first.split("\t")[0] == "plan"
        assert [x.split("\t")[0] for x in choices.splitlines()] == ["latency", "throughput"]
        assert top.split("\t")[0] == "--top-p"
    if exe:   # the shell itself checks the syntax where it is installed
        check = [exe, "-n", "/dev/stdin"] if shell == "zsh" else [exe, "--no-execute"]
        q = subprocess.run(check, input=p.stdout, capture_output=True, text=True, timeout=30)
        assert q.returncode == 0, q.stderr
    assert _vramancer(tmp_path, "completion", "powershell").returncode == 2


# -- did you mean -------------------------------------------------------------------------------

def test_unknown_model_did_you_mean(capsys):
    assert cli(["plan", "lama-3.1-70b", "-d", "rtx3090"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean llama-3.1-70b?" in err
    assert cli(["plan", "no-such-model-xyz", "-d", "rtx3090"]) == 2
    assert "did you mean" not in capsys.readouterr().err


# -- output that fits a pipe --------------------------------------------------------------------

def test_devices_catalog_in_a_pipe_full_keys_no_colour(tmp_path):
    from vramancer.devices.catalog import list_gpus

    p = _vramancer(tmp_path, "devices", "--catalog", COLUMNS="60")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "…" not in p.stdout
    rows = p.stdout.splitlines()
    assert rows[0].split()[:2] == ["key", "name"]
    assert [r.split()[0] for r in rows[1:]] == [g.key for g in list_gpus()]
    p = _vramancer(tmp_path, "devices", "--catalog", "--json")
    assert [g["key"] for g in json.loads(p.stdout)["gpus"]] == [g.key for g in list_gpus()]


def test_terminal_tables_wrap_but_never_cut_the_key():
    from rich.console import Console

    from vramancer.terminal import Column, print_table

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=40, color_system=None)
    keys = ["rtx3060-12gb", "a100-80gb-sxm", "mygpu-with-a-long-name"]
    print_table(console, "t", [Column("key", key=True), Column("name"), Column("memory", right=True)],
                [(k, "a name long enough to wrap " * 2, "12.0 GiB") for k in keys])
    text = out.getvalue()
    for k in keys:
        assert k in text
    assert "…" not in text


def test_plan_list_models_json_and_plain(capsys):
    from vramancer.models.catalog import list_models

    assert cli(["plan", "--list-models", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schema"] == 1 and [m["name"] for m in d["models"]] == [m.key for m in list_models()]
    assert {"hf_id", "kind", "description", "aliases"} <= set(d["models"][0])
    assert cli(["plan", "--list-models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == [m.key for m in list_models()]


def test_plan_exports_are_never_wrapped_and_no_colour(tmp_path):
    p = _vramancer(tmp_path, "plan", "llama-3.1-70b", "-d", "rtx3090,rtx3060,rtx3060,rtx4090,a100-80gb",
                   "--dtype", "q4_k_m", COLUMNS="40")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout + p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("llama.cpp: "))
    assert line.startswith("llama.cpp: --tensor-split ") and " -ngl " in line and " -c 4096" in line
    assert len(line) > 40


def test_monitor_no_tui_json_lines(tmp_path):
    p = _vramancer(tmp_path, "monitor", "--no-tui", "--json", "--duration", "1.2", "--interval", "0.2")
    assert p.returncode == 0, p.stderr
    docs = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(docs) >= 2
    assert all({"timestamp", "devices", "phase"} <= set(d) for d in docs)
    assert any(dev["device"] == "cpu" and dev["total_bytes"] > 0 for d in docs for dev in d["devices"])


# -- run and chat -------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama with the demo's tokenizer, saved as a folder."""
    from tests.models.tiny import chat_llama

    model, tok = chat_llama(num_hidden_layers=2, max_position_embeddings=8192, std=None)
    out = tmp_path_factory.mktemp("polish") / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def escaping_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose every greedy token is ESC (0x1b): the final LayerNorm outputs a constant
    (weight 0, bias = ESC's embedding), and ESC's embedding is the longest, so it wins every step."""
    from vramancer.runtime.demo_model import build_demo_tokenizer

    tok = build_demo_tokenizer()
    esc = tok("\x1b", add_special_tokens=False)["input_ids"]
    assert len(esc) == 1
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[esc[0]] *= 50
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[esc[0]])
    out = tmp_path_factory.mktemp("escape") / "esc-gpt2"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_model_output_control_bytes_are_escaped(escaping_folder, capsys):
    assert cli(["run", str(escaping_folder), "-p", "Hi \x1b[2J", "-n", "5", "-d", "rtx3090", "-c", "64"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "Hi \\x1b[2J" + "\\x1b" * 5 in out
    assert cli(["run", str(escaping_folder), "-p", "Hi", "-n", "3", "-d", "rtx3090", "-c", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generation"]["text"] == "\x1b" * 3   # JSON keeps the real text


def test_escape_control_keeps_text_and_newlines():
    from vramancer.terminal import escape_control

    assert escape_control("héllo\n\tworld ✓") == "héllo\n\tworld ✓"
    assert escape_control("a\x1b[31mb\x07\r\x00\x7f\x9b") == "a\\x1b[31mb\\x07\\x0d\\x00\\x7f\\x9b"


def test_prompt_from_stdin_file_and_dash(folder, capsys, monkeypatch, tmp_path):
    base = ["run", str(folder), "-n", "2", "-d", "rtx3090", "-c", "64", "-q"]
    monkeypatch.setattr("sys.stdin", io.StringIO("piped words\n"))
    assert cli(base) == 0
    out = capsys.readouterr().out
    assert out.startswith("piped words") and out.count("\n") == 1           # -q: the text only
    monkeypatch.setattr("sys.stdin", io.StringIO("dash words\n"))
    assert cli([*base, "-p", "-"]) == 0
    assert capsys.readouterr().out.startswith("dash words")
    (tmp_path / "p.txt").write_text("file words")
    assert cli([*base, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out.startswith("file words")
    monkeypatch.setattr("sys.stdin", _Tty(""))
    assert cli(base) == 2                                                   # a terminal, no prompt: say how
    assert "which prompt?" in capsys.readouterr().err
    assert cli([*base, "-p", "x", "--prompt-file", str(tmp_path / "p.txt")]) == 2
    assert cli([*base, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_seed_and_top_p(folder, capsys):
    argv = ["run", str(folder), "-p", "Hello", "-n", "12", "-d", "rtx3090", "-c", "64", "--temperature", "1.5",
            "--top-p", "0.9", "--json"]
    runs = []
    for seed in ("7", "7"):
        assert cli([*argv, "--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["generation"]["token_ids"])
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert cli([*argv, "--top-p", "1.5"]) == 2
    assert cli([*argv, "--seed", "-1"]) == 2


def test_run_plan_conflicts_with_planner_flags(folder, capsys, tmp_path):
    plan_file = tmp_path / "plan.json"
    assert cli(["plan", str(folder), "-d", "rtx3090,rtx3060", "--split", "1,1", "-c", "64", "-o", str(plan_file)]) == 0
    capsys.readouterr()
    assert cli(["run", str(folder), "-p", "Hi", "--plan", str(plan_file), "--devices", "rtx4090"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already fixes --devices" in err
    assert cli(["run", str(folder), "-p", "Hi", "--plan", str(plan_file), "-d", "rtx4090", "-c", "32"]) == 2
    assert "--devices, --context" in capsys.readouterr().err
    assert cli(["chat", str(folder), "--plan", str(plan_file), "--batch", "2"]) == 2        # chat and serve too
    assert "already fixes --batch" in capsys.readouterr().err
    assert cli(["serve", str(folder), "--plan", str(plan_file), "-d", "rtx4090", "--port", "0"]) == 2
    assert "already fixes --devices" in capsys.readouterr().err
    assert cli(["run", str(folder), "-p", "Hi", "-n", "2", "--plan", str(plan_file)]) == 0


def test_config_devices_do_not_conflict_with_a_plan(folder, capsys, tmp_path):
    plan_file = tmp_path / "plan.json"
    assert cli(["plan", str(folder), "-d", "rtx3090", "-c", "64", "-o", str(plan_file)]) == 0
    _write_config(tmp_path, 'devices = "rtx4090,rtx3060"\n')
    capsys.readouterr()
    assert cli(["run", str(folder), "-p", "Hi", "-n", "2", "--plan", str(plan_file), "--json"]) == 0
    assert [s["device"] for s in json.loads(capsys.readouterr().out)["plan"]["stages"]] == ["rtx3090#0"]


@pytest.mark.parametrize("command", ["run", "chat"])
def test_ctrl_c_says_interrupted_and_exits_130(folder, tmp_path, command):
    argv = [sys.executable, "-m", "vramancer", command, str(folder), "-n", "6000", "-d", "rtx3090", "-c", "8192",
            "--temperature", "0"]
    if command == "run":
        argv += ["-p", "Once"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path), cwd=tmp_path)
    try:
        if command == "chat":
            proc.stdin.write(b"tell me a long story\n")
            proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        got = b""
        deadline = time.monotonic() + 120
        while len(got) < 20 and time.monotonic() < deadline and proc.poll() is None:   # generating now
            got += proc.stdout.read() or b""
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "vramancer: interrupted"
    assert "Traceback" not in err.decode()


# -- serve: request log, 404 for a model it does not serve ---------------------------------------

def test_serve_logs_each_request_and_404s_other_models(tmp_path, caplog):
    httpx = pytest.importorskip("httpx")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vramancer.serve.app import ACCESS_LOG
    from vramancer.serve.server import ServerThread
    from vramancer.serve.testing import build_tiny_chat_model

    path = build_tiny_chat_model(tmp_path / "tiny-chat")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    caplog.set_level(logging.INFO, logger=ACCESS_LOG)
    with ServerThread(model, AutoTokenizer.from_pretrained(path), model_name="tiny", context_tokens=128,
                      max_batch=2, max_tokens_limit=64) as srv:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "gpt-4"}, timeout=60)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
        assert "gpt-4" in r.json()["error"]["message"] and "tiny" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "model": "other"}, timeout=60)
        assert r.status_code == 404
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "tiny"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True}) as s:
            assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOG]
    assert len(lines) == 5, lines
    assert lines[0].startswith("POST /v1/chat/completions 404 tokens=- ") and lines[0].endswith(" s")
    assert lines[1].startswith("POST /v1/completions 404 tokens=- ")
    assert lines[2].startswith(f"POST /v1/chat/completions 200 tokens={prompt_tokens}+5 ")
    assert lines[3].startswith("POST /v1/completions 200 tokens=") and "+3 " in lines[3]   # streamed: at the end
    assert lines[4].startswith("GET /health 200 tokens=- ")
    assert all(float(line.split()[-2]) >= 0 for line in lines)


def test_plan_table_on_a_narrow_terminal_cuts_nothing():
    from rich.console import Console

    from vramancer.plan.commands import render_plan
    from vramancer.plan.planner import plan

    p = plan("llama-3.1-70b", devices="rtx3090,rtx3060,cpu:64GiB", context=16384, dtype="q4_k_m")
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, color_system=None)
    render_plan(p, console)
    text = out.getvalue()
    assert "…" not in text
    table = text.splitlines()[1:1 + 1 + len(p.stages)]
    for stage, row in zip(p.stages, table[1:], strict=True):
        assert row.split()[1] == stage.device
    assert console.width == 60                       # the console is left as it was


def test_no_color_is_respected_even_when_colour_is_forced(tmp_path):
    colour = re.compile(r"\x1b\[[0-9;]*3[0-7]m|\x1b\[[0-9;]*38;")      # a foreground colour, any form
    p = _vramancer(tmp_path, "plan", "llama-3.1-8b", "-d", "rtx3090", FORCE_COLOR="1")
    assert p.returncode == 0 and colour.search(p.stdout)                  # rich colours when told to
    p = _vramancer(tmp_path, "plan", "llama-3.1-8b", "-d", "rtx3090", FORCE_COLOR="1", NO_COLOR="1")
    assert p.returncode == 0 and not colour.search(p.stdout)
    p = _vramancer(tmp_path, "plan", "llama-3.1-8b", "-d", "rtx3090")     # a pipe: no escape at all
    assert p.returncode == 0 and "\x1b" not in p.stdout
