"""`vramancer pull`, and `plan` / `run` on a Hub id, against a loopback server speaking the Hub's
file API (never the real Hub): what is fetched, what is announced first, resume after a cut
transfer, and a plan stage's shards only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .hubserver import Repo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramancer.cli import main as cli  # noqa: E402

RUN_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors.index.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama with a real tokenizer, saved in 4+ shards with an index, as big repos are."""
    from tests.models.tiny import chat_llama

    model, tok = chat_llama()
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(folder, max_shard_size="30KB")
    tok.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    return folder


def _published(tiny_folder: Path) -> Repo:
    """The folder as a Hub repo has it, with files a run never needs beside it."""
    extra = {"README.md": b"# tiny\n", "pytorch_model.bin": b"\x80" * 4096, "onnx/model.onnx": b"\x00" * 2048}
    return Repo.from_folder("tiny-org/tiny-llama", tiny_folder, extra)


def _expected_run_files(repo: Repo) -> set[str]:
    return {p for p in repo.files if p in RUN_FILES or (p.startswith("model-") and p.endswith(".safetensors"))}


def _resolve_gets(hub) -> set[str]:
    return {r.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for r in hub.log
            if r.method == "GET" and "/resolve/" in r.path and r.range is None}


def test_pull_end_to_end(hub, tiny_folder, capsys):
    import vramancer

    repo = hub.add(_published(tiny_folder))
    want = _expected_run_files(repo)
    rc = cli(["pull", "tiny-org/tiny-llama"])
    out = capsys.readouterr().out
    assert rc == 0, out
    total = sum(len(repo.files[p]) for p in want)
    from vramancer.units import format_bytes

    head, _, tail = out.partition("done: ")
    assert f"{len(want)} files, {format_bytes(total)} to download" in head   # announced before the download
    assert all(p in head for p in want) and "pytorch_model.bin" not in head and "README" not in head
    snapshot = Path(tail.strip())
    assert {p.name for p in snapshot.iterdir()} == want
    assert all((snapshot / p).read_bytes() == repo.files[p] for p in want)
    assert _resolve_gets(hub) == want                                      # nothing else was transferred
    prof = vramancer.profile("tiny-org/tiny-llama")                        # resolved from the cache now
    assert Path(prof.path) == snapshot and prof.weights_bytes == vramancer.profile(str(tiny_folder)).weights_bytes
    n = len(hub.log)
    assert cli(["pull", "tiny-org/tiny-llama"]) == 0          # all there: headers read again, no file transferred
    assert not [r for r in hub.log[n:] if r.method == "GET" and "/resolve/" in r.path and r.range is None]


def test_pull_resumes_a_cut_transfer(hub, tiny_folder, tmp_path, capsys):
    """A shard of 24 MiB whose first transfer stops halfway: huggingface_hub asks for the rest
    with a Range request from the bytes it has (it writes in chunks of 10 MiB), and the file ends
    whole."""
    from safetensors.torch import load, save

    repo = _published(tiny_folder)
    shard = sorted(p for p in repo.files if p.startswith("model-"))[1]
    tensors = load(repo.files[shard])
    tensors["extra.padding"] = torch.randn(6 * 2**20)
    repo.files[shard] = save(tensors, metadata={"format": "pt"})
    index = json.loads(repo.files["model.safetensors.index.json"])
    index["weight_map"]["extra.padding"] = shard
    repo.files["model.safetensors.index.json"] = json.dumps(index).encode()
    repo = hub.add(Repo(repo.repo_id, repo.files))
    hub.drop_once.add(shard)
    local = tmp_path / "local"
    assert cli(["pull", "tiny-org/tiny-llama", "--local-dir", str(local)]) == 0
    gets = hub.fetched(shard)
    full = [g for g in gets if g.range is None]
    resumed = [g for g in gets if g.range and not g.range.startswith("bytes=0-")]   # (not the header read)
    assert len(full) == 1 and len(resumed) == 1
    start = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(repo.files[shard]) // 2                       # picked up where the cut left it
    assert (local / shard).read_bytes() == repo.files[shard]
    assert {p.name for p in local.iterdir() if p.is_file()} == _expected_run_files(repo)
    capsys.readouterr()


def test_pull_only_a_plan_stages_shards(hub, tiny_folder, tmp_path, capsys, monkeypatch):
    from vramancer.plan.planner import plan as make_plan

    repo = hub.add(_published(tiny_folder))
    plan = make_plan(str(tiny_folder), devices="rtx3090,rtx3060,rtx4090", split=[1, 1, 1], context=64)
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    index = json.loads(repo.files["model.safetensors.index.json"])["weight_map"]
    for stages in ([0], [2], [0, 2]):
        blocks = [b for s in stages for b in range(*plan.stages[s].blocks)]
        mods = [m for b in blocks for m in plan.blocks[b].modules]
        names = {n for n in index if any(n == m or n.startswith(m + ".") for m in mods)}
        want = {index[n] for n in names}
        assert want and want != set(index.values())
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"cache-{'-'.join(map(str, stages))}"))
        hub.log.clear()
        rc = cli(["pull", "tiny-org/tiny-llama", "--include-stage-of", str(plan_file),
                  "--stages", ",".join(map(str, stages))])
        assert rc == 0, capsys.readouterr()
        got = {p for p in _resolve_gets(hub) if p.endswith(".safetensors")}
        assert got == want, (stages, got, want)
        assert _resolve_gets(hub) - got == RUN_FILES                      # config, tokenizer, index: always
    capsys.readouterr()


def test_pull_dry_run_fetches_nothing(hub, tiny_folder, capsys):
    repo = hub.add(_published(tiny_folder))
    assert cli(["pull", "tiny-org/tiny-llama", "--dry-run"]) == 0
    assert f"{len(_expected_run_files(repo))} files" in capsys.readouterr().out
    assert _resolve_gets(hub) <= {"config.json", "model.safetensors.index.json"}   # read to size the shards


def test_pull_bad_input(hub, tiny_folder, tmp_path, capsys):
    hub.add(_published(tiny_folder))
    assert cli(["pull", "tiny-org/nope"]) == 2
    assert "no such model repository" in capsys.readouterr().err
    assert cli(["pull", "tiny-org/tiny-llama", "--revision", "v9"]) == 2
    assert "no such revision" in capsys.readouterr().err
    assert cli(["pull", "tiny-org/tiny-llama", "--stages", "0"]) == 2
    assert "--include-stage-of" in capsys.readouterr().err
    other = tmp_path / "other.json"
    from vramancer.plan.planner import plan as make_plan

    make_plan("llama-3.1-8b", devices="rtx3090,rtx3090,rtx3090,rtx3090", context=64).save(other)
    assert cli(["pull", "tiny-org/tiny-llama", "--include-stage-of", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and len(err.strip().splitlines()) == 1


def test_unreachable_hub_is_one_line(monkeypatch, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                               # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    assert cli(["pull", "tiny-org/tiny-llama"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny-org/tiny-llama" in err


def test_plan_on_a_hub_id_says_what_a_run_downloads(hub, tiny_folder, capsys):
    import vramancer

    repo = hub.add(_published(tiny_folder))
    rc = cli(["plan", "tiny-org/tiny-llama", "--devices", "rtx3090,rtx3060", "--context", "64", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    want = _expected_run_files(repo)
    from vramancer.units import format_bytes

    assert f"{len(want)} files, {format_bytes(sum(len(repo.files[p]) for p in want))}" in cap.err
    d = json.loads(cap.out)
    assert d["model"] == "tiny-org/tiny-llama"
    local_plan = vramancer.plan(str(tiny_folder), devices="rtx3090,rtx3060", context=64)
    assert [s["weights_bytes"] for s in d["stages"]] == [s.weights_bytes for s in local_plan.stages]
    shards = {p for p in repo.files if p.endswith(".safetensors")}
    full_gets = _resolve_gets(hub)
    assert not (full_gets & shards)                                         # headers only: range reads
    assert all(r.range for r in hub.log if r.method == "GET" and r.path.endswith(".safetensors"))
    hub.log.clear()                                       # a catalog entry's HF id is planned with no request
    assert cli(["plan", "Qwen/Qwen2.5-7B-Instruct", "--devices", "rtx3090", "--context", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "qwen2.5-7b" and hub.log == []


def test_run_on_a_hub_id_announces_then_downloads(hub, tiny_folder, capsys):
    repo = hub.add(_published(tiny_folder))
    rc = cli(["run", "tiny-org/tiny-llama", "--prompt", "Once upon", "--max-new-tokens", "4",
              "--devices", "rtx3090,rtx3060", "--split", "1,1", "--context", "64", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    want = _expected_run_files(repo)
    from vramancer.units import format_bytes

    assert f"downloading tiny-org/tiny-llama @ {repo.commit[:12]}: {len(want)} files, " \
           f"{format_bytes(sum(len(repo.files[p]) for p in want))}" in cap.err
    assert _resolve_gets(hub) == want
    d = json.loads(cap.out)
    assert d["generation"]["new_tokens"] == 4
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    enc = tok("Once upon", return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert d["generation"]["token_ids"] == out[0, enc["input_ids"].shape[1]:].tolist()
