"""`vramancer plan` and `vramancer devices` as a person uses them: tables, JSON, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vramancer.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_table_for_the_issue_example(capsys):
    # bf16 70B (131 GiB) cannot fit 24 + 12 GiB of GPUs + 64 GiB of RAM: exit 3, and say what would
    code, out, err = run(capsys, "plan", "llama-3.1-70b", "--devices", "rtx3090,rtx3060,cpu:64GiB",
                         "--context", "16384")
    assert code == 3
    assert "short" in err and "--dtype int8 fits on these devices" in err
    # in 4-bit it runs, partly from host RAM
    code, out, err = run(capsys, "plan", "llama-3.1-70b", "--devices", "rtx3090,rtx3060,cpu:64GiB",
                         "--context", "16384", "--dtype", "q4_k_m")
    assert code == 0, err
    assert "rtx3090#0" in out and "rtx3060-12gb#0" in out and "cpu" in out
    assert "Does not fit on the GPUs" in out
    assert "to fit on the GPUs:" in out and "tokens/s" in out


def test_plan_json_matches_schema(capsys, tmp_path):
    out_file = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--devices", "rtx3090,rtx3060", "--context", "8192",
                         "--json", "-o", str(out_file))
    assert code == 0, err
    d = json.loads(out)
    assert d == json.loads(out_file.read_text())
    assert d["schema"] == 2 and d["fits"] is True
    assert len(d["identity"]["config_sha256"]) == 64 and d["identity"]["dtype"] == d["workload"]["dtype"]
    assert d["blocks"][1]["modules"] == ["model.layers.0"] and d["blocks"][1]["layer_index"] == 0
    assert d["blocks"][0]["layer_index"] is None and "lm_head" in d["blocks"][-1]["modules"]
    assert all(s["mode"] == "execute" and s["compute_device"] == s["device"] for s in d["stages"])
    assert d["stream_buffers"] == []
    assert d["workload"]["context"] == 8192
    assert d["max_context"] >= 8192
    blocks = [b for s in d["stages"] for b in range(*s["blocks"])]
    assert blocks == list(range(len(d["blocks"])))
    assert d["exports"]["llama_cpp"].startswith("--tensor-split")
    assert "model.embed_tokens" in d["device_map"] and "lm_head" in d["device_map"]
    layer_counts = [int(x) for x in d["exports"]["vllm_pp_layer_partition"].split(",")]
    assert sum(layer_counts) == 32


@pytest.mark.parametrize("argv,code", [
    (["plan", "no-such-model-xyz", "--devices", "rtx3090"], 2),
    (["plan", "llama-3.1-8b", "--devices", "rtx9999"], 2),
    (["plan", "llama-3.1-8b", "--devices", "rtx3090", "--context", "-5"], 2),
    (["plan", "llama-3.1-8b", "--devices", "rtx3090", "--dtype", "float7"], 2),
    (["plan", "llama-3.1-8b", "--devices", "rtx3090", "--split", "a,b"], 2),
    (["plan", "llama-3.1-405b", "--devices", "rtx3060"], 3),
    (["plan", "llama-3.1-8b", "--devices", "rtx3060,rtx3090", "--split", "1,0", "--context", "32768"], 3),
])
def test_errors_are_one_line_with_exit_code(capsys, argv, code):
    got, out, err = run(capsys, *argv)
    assert got == code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vramancer: error:"), err
    assert "Traceback" not in err


def test_cli_subprocess_exit_code_and_no_traceback():
    p = subprocess.run([sys.executable, "-m", "vramancer", "plan", "llama-3.1-405b", "--devices", "rtx3060"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3
    assert "Traceback" not in p.stderr and "short" in p.stderr


def test_devices_json_and_catalog(capsys):
    code, out, _ = run(capsys, "devices", "--devices", "rtx3090,cpu:32GiB", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["schema"] == 1
    assert [x["id"] for x in d["devices"]] == ["rtx3090#0", "cpu"]
    for key in ("name", "kind", "simulated", "backing", "total_bytes", "free_bytes", "bandwidth_bytes_per_s",
                "tflops", "uuid", "pci_bus_id"):
        assert key in d["devices"][0]
    code, out, _ = run(capsys, "devices", "--catalog")
    assert code == 0 and "rtx3090" in out
