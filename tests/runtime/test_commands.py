"""`vramancer run`, `chat` and `demo` end to end, in process: output, JSON, exit codes."""
from __future__ import annotations

import io
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramancer.cli import main as cli  # noqa: E402


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny Llama with the demo's real tokenizer (and chat template), saved as a folder."""
    from tests.models.tiny import chat_llama

    model, tok = chat_llama()
    folder = tmp_path_factory.mktemp("chat") / "tiny-llama"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _reference_ids(folder, prompt: str, n: int) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_run_json(chat_folder, capsys):
    rc = cli(["run", str(chat_folder), "--prompt", "A model that does not fit", "--max-new-tokens", "12",
              "--devices", "rtx3090,rtx3060", "--split", "1,1", "--context", "128", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    gen = d["generation"]
    assert gen["token_ids"] == _reference_ids(chat_folder, "A model that does not fit", 12)
    assert gen["new_tokens"] == len(gen["token_ids"])
    assert gen["decode_tokens_per_s"] >= 0 and gen["prompt_tokens"] > 0
    assert [s["device"] for s in d["plan"]["stages"]] == ["rtx3090#0", "rtx3060-12gb#0"]
    for st, mem in zip(d["plan"]["stages"], d["memory"]["stages"]):
        assert mem["weights_bytes"] == st["weights_bytes"]
        assert 0 < mem["kv_cache_bytes"] <= st["kv_cache_bytes"]


def test_run_streams_text_and_summary(chat_folder, capsys, tmp_path):
    plan_file = tmp_path / "plan.json"
    assert cli(["plan", str(chat_folder), "--devices", "rtx3090,rtx3060", "--split", "1,1",
                "--context", "128", "-o", str(plan_file)]) == 0
    capsys.readouterr()
    rc = cli(["run", str(chat_folder), "--prompt", "Hello", "--max-new-tokens", "6", "--plan", str(plan_file)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Hello" in out and "decode" in out and "prefill" in out
    assert "rtx3060-12gb#0" in out and "weights" in out


def test_chat_reads_lines_until_exit(chat_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("how are cards shared?\n\nwhat about disk?\n/exit\nnot read\n"))
    rc = cli(["chat", str(chat_folder), "--max-new-tokens", "5", "--temperature", "0",
              "--devices", "rtx3090,rtx3060", "--split", "1,1", "--context", "256"])
    captured = capsys.readouterr()
    assert rc == 0
    assert len(captured.out.strip("\n").split("\n")) >= 2  # one answer line per user line
    assert "split over" in captured.err


def test_chat_ends_at_end_of_input(chat_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one line\n"))
    rc = cli(["chat", str(chat_folder), "--max-new-tokens", "3", "--devices", "rtx3090", "--context", "128",
              "--stats"])
    assert rc == 0
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code", [
    (["run", "/no/such/folder", "--prompt", "x"], 2),
    (["run", "{folder}", "--prompt", "x", "--max-new-tokens", "0"], 2),
    (["run", "{folder}", "--prompt", "x", "--devices", "rtx3090:1MiB,rtx3060", "--split", "1,1"], 3),
    (["run", "{folder}", "--prompt", "x", "--plan", "/no/such/plan.json"], 2),
])
def test_run_exit_codes(chat_folder, capsys, argv, code):
    argv = [a.replace("{folder}", str(chat_folder)) for a in argv]
    assert cli(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("vramancer: error:") and "Traceback" not in err


def test_demo_matches_unsplit(tmp_path, capsys):
    rc = cli(["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "8", "--context", "256", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["matches_unsplit"] is True
    assert len(d["plan"]["stages"]) == 2
    assert d["generation"]["token_ids"] == d["unsplit"]["token_ids"]
    assert [m["weights_bytes"] for m in d["memory"]["stages"]] == [s["weights_bytes"] for s in d["plan"]["stages"]]
    # the second run reuses the cached model folder
    assert cli(["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "4", "--context", "256"]) == 0
    out = capsys.readouterr().out
    assert "split output matches unsplit: yes" in out
