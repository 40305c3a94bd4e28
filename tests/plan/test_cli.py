"""`vramancer plan` and `vramancer devices` as a person uses them: tables, JSON, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vramancer.cli import main
from vramancer.devices.spec import parse_devices


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_table_for_the_issue_example(capsys):
    # bf16 70B (131 GiB) cannot fit 24 + 12 GiB of GPUs + 64 GiB of RAM: exit 3, the closest placement
    # as a table, one error line, and what would fit, with its figures
    code, out, err = run(capsys, "plan", "llama-3.1-70b", "--devices", "rtx3090,rtx3060,cpu:64GiB",
                         "--context", "16384")
    assert code == 3
    assert err.count("\n") == 1 and "short" in err
    assert "rtx3090#0" in out and "cpu" in out and "weights" in out     # the table is there
    assert "--dtype int8: weights 67.7 GiB, fits" in out and "tokens/s decode" in out
    # in 4-bit it runs, partly from host RAM
    code, out, err = run(capsys, "plan", "llama-3.1-70b", "--devices", "rtx3090,rtx3060,cpu:64GiB",
                         "--context", "16384", "--dtype", "q4_k_m")
    assert code == 0, err
    assert "rtx3090#0" in out and "rtx3060-12gb#0" in out and "cpu" in out
    assert "do not fit on the GPUs and run from cpu" in out and "tokens/s" in out
    assert "VLLM_PP_LAYER_PARTITION" not in out     # vLLM's pipeline has no host-RAM stage: no export


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


def _apply(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced when present, else appended)."""
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def _check_advice(capsys, argv: list[str], advice: list[dict]) -> None:
    """Every piece of advice, applied, gives a plan that runs, with the figures the advice gave."""
    assert advice
    for a in advice:
        assert "tokens/s decode" in a["text"] and a["text"].startswith(f"{a['flag']} {a['value']}:")
        code, out, err = run(capsys, *_apply(argv, a["flag"], a["value"]), "--json")
        assert code == 0, (a, err)
        d = json.loads(out)
        assert d["fits"] == a["fits_on_gpus"] and d["shortfall_bytes"] == 0 or not a["fits_on_gpus"]
        assert d["predicted"]["decode_tokens_per_s"] == a["decode_tokens_per_s"]
        assert sum(s["blocks"][1] - s["blocks"][0] for s in d["offloaded"]) == a["blocks_off_gpus"]


def test_readme_split_example_fits(capsys):
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--devices", "rtx3090,rtx3060", "--split", "3,1",
                         "--reserve", "1GiB")
    assert code == 0, err
    assert "Fits on the GPUs" in out
    assert "--tensor-split 24,8 -ngl 33" in out and "VLLM_PP_LAYER_PARTITION=24,8" in out


def test_manual_split_that_overflows_is_said_once_with_checked_advice(capsys):
    argv = ["plan", "llama-3.1-8b", "--devices", "rtx3060,rtx3060", "--split", "3,1", "--reserve", "1GiB"]
    code, out, err = run(capsys, *argv)
    assert code == 3
    assert (out + err).count("170.4 MiB") == 1                 # the shortage, said once (the error line)
    assert err == "vramancer: error: llama-3.1-8b does not fit: rtx3060-12gb#0 is 170.4 MiB short\n"
    assert "embed+L0-23" in out and "-170M" in out and "L24-31+head" in out   # the table, what is short where
    assert "To fit, try one of:" in out
    assert "VLLM_PP_LAYER_PARTITION" not in out and "llama.cpp:" not in out   # exports of a plan that cannot run
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 3
    d = json.loads(out)
    assert d["fits"] is False and d["shortfall_bytes"] == 178_651_136
    assert [s["blocks"] for s in d["stages"]] == [[0, 25], [25, 34]]
    assert d["suggestions"] == [a["text"] for a in d["advice"]]
    assert {a["flag"] for a in d["advice"]} >= {"--split", "--context", "--dtype"}
    _check_advice(capsys, argv, d["advice"])


def test_does_not_fit_shows_the_closest_placement_and_checked_advice(capsys):
    argv = ["plan", "llama-3.1-8b", "--devices", "rtx3060"]
    code, out, err = run(capsys, *argv)
    assert code == 3
    assert "embed+L0-31+head" in out and "-4.5G" in out
    assert err.count("\n") == 1 and "rtx3060-12gb#0 is 4.5 GiB short" in err
    code, out, _ = run(capsys, *argv, "--json")
    d = json.loads(out)
    assert code == 3 and d["fits"] is False and d["shortfall_bytes"] > 4 * 2**30 and d["stages"]
    flags = [a["flag"] for a in d["advice"]]
    # what llama.cpp users try first: host RAM (and the disk tier too on a machine with little free RAM)
    assert flags[0] == "--devices" and d["advice"][0]["value"] in ("rtx3060,cpu", "rtx3060,cpu,disk")
    assert "--dtype" in flags
    _check_advice(capsys, argv, d["advice"])


def test_no_gpu_is_one_coherent_message_without_empty_exports(capsys):
    code, out, err = run(capsys, "plan", "llama-3.2-1b", "--devices", "cpu:64GiB")
    assert code == 0, err
    assert "No GPU in --devices: all 18 blocks run from cpu (execute)." in out
    assert "not fit" not in out and "GPU memory" not in out and "short" not in out
    assert "llama.cpp: -ngl 0 -c 4096" in out and "VLLM_PP_LAYER_PARTITION" not in out
    code, out, err = run(capsys, "plan", "llama-3.2-1b", "--devices", "cpu:64GiB", "--json")
    d = json.loads(out)
    assert d["exports"] == {"llama_cpp": "-ngl 0 -c 4096"} and d["advice"] == [] and d["suggestions"] == []
    assert not any("fit" in note or "GPU memory" in note for note in d["notes"])


def test_pipeline_path_and_a_device_met_twice():
    import io

    from rich.console import Console

    from vramancer.models.resolve import profile
    from vramancer.plan.commands import render_plan
    from vramancer.plan.plan import Workload
    from vramancer.plan.planner import plan_placement

    prof = profile("llama-3.1-8b", dtype="q4_k_m")
    devs = parse_devices("rtx3090,rtx3060,cpu:64GiB")
    n = prof.num_blocks
    where = ["rtx3060-12gb#0"] * 6 + ["rtx3090#0"] * 14 + ["cpu"] * (n - 21) + ["rtx3090#0"]
    p = plan_placement(prof, devs, Workload(dtype=prof.dtype), where)
    buf = io.StringIO()
    render_plan(p, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert "pipeline: rtx3060-12gb#0 -> rtx3090#0 -> cpu -> rtx3090#0" in text
    assert "the head comes back to rtx3090#0" in text
    assert text.count("rtx3090#0 appears twice: stages 1 and 3") == 1
    assert text.count("rtx3090#0 = NVIDIA GeForce RTX 3090") == 1
    rows = [line for line in text.splitlines() if line.lstrip().startswith("3 ")]
    assert len(rows) == 1 and "head" in rows[0] and "in #1" in rows[0]   # its total is on row 1 only


def _config_folder(tmp_path, max_positions: int):
    folder = tmp_path / f"llama-{max_positions}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1024, "max_position_embeddings": max_positions, "torch_dtype": "float32",
        "tie_word_embeddings": False}))
    return str(folder)


def test_a_gpu_left_unused_is_explained(capsys, tmp_path):
    code, out, err = run(capsys, "plan", _config_folder(tmp_path, 2048), "--devices", "rtx3090,rtx3060")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("rtx3060-12gb#0 unused"))
    assert line.startswith("rtx3060-12gb#0 unused: the whole model fits on rtx3090#0")
    assert "add a hop (" in line and " ms/token)" in line
    assert "--split 2,1 predicts" in line and "tokens/s decode against" in line and "--objective throughput" in line


def test_default_context_never_exceeds_the_model(capsys, tmp_path):
    folder = _config_folder(tmp_path, 512)
    code, out, err = run(capsys, "plan", folder, "--devices", "rtx3090", "--json")
    assert code == 0 and err == ""
    assert json.loads(out)["workload"]["context"] == 512
    code, out, err = run(capsys, "plan", folder, "--devices", "rtx3090", "--context", "2048")
    assert code == 0
    assert err == "vramancer: warning: context 2048 is beyond the model's trained maximum of 512 tokens\n"
    assert "trained maximum" not in out                      # warned once, on stderr
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--devices", "rtx3090", "--json")
    assert json.loads(out)["workload"]["context"] == 4096    # 131072 trained: the default stays 4096


def test_run_chat_and_serve_plans_warn_beyond_the_trained_context(capsys, tmp_path):
    # run, chat and serve plan through make_plan: the same warning, on stderr, and the plan goes ahead
    import argparse

    from vramancer.plan.commands import add_planner_flags
    from vramancer.runtime.commands import make_plan

    parser = argparse.ArgumentParser()
    add_planner_flags(parser)
    folder = _config_folder(tmp_path, 512)
    args = parser.parse_args(["--devices", "rtx3090", "--context", "1024"])
    args.plan = None
    p = make_plan(args, folder)
    assert p.workload.context == 1024
    assert capsys.readouterr().err == ("vramancer: warning: context 1024 is beyond the model's trained maximum "
                                       "of 512 tokens\n")
    args = parser.parse_args(["--devices", "rtx3090"])
    args.plan = None
    assert make_plan(args, folder).workload.context == 512 and capsys.readouterr().err == ""
