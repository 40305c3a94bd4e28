"""Load progress: every tensor placed is counted on its stage, bars drawn only on a terminal."""
from __future__ import annotations

import io
import json

import pytest

torch = pytest.importorskip("torch")

from tests.runtime.conftest import make_plan, offload_plan  # noqa: E402
from vramancer.runtime.loader import load  # noqa: E402
from vramancer.runtime.progress import LoadProgress  # noqa: E402


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_each_stage_weights_exactly(saved_models):
    """Split in 2: the bytes counted per stage are the runtime's measured weights of that stage and
    the plan's weights (tied embeddings counted on each stage that holds a copy)."""
    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    with LoadProgress(plan, enabled=False) as progress:
        model = load(str(folder), plan=plan, progress=progress)
    report = model.vramancer.memory_report()
    assert progress.bytes == [s.weights_bytes for s in report.stages]   # computed buffers are not loaded
    assert progress.bytes == [s.weights_bytes for s in plan.stages]
    state = model.state_dict()
    assert progress.placed_tensors >= len({id(t) for t in state.values()})
    assert progress.seconds is not None and progress.seconds >= 0
    assert progress.summary().startswith("loaded ")
    model.vramancer.free()


def test_progress_counts_streamed_and_disk_stages(saved_models):
    folder = saved_models["llama"]
    plan = offload_plan(folder)
    with LoadProgress(plan, enabled=False) as progress:
        model = load(str(folder), plan=plan, progress=progress)
    assert progress.bytes == [s.weights_bytes for s in plan.stages]
    model.vramancer.free()


def test_bars_only_on_a_terminal(saved_models):
    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    piped, tty = io.StringIO(), _Tty()
    for stream in (piped, tty):
        with LoadProgress(plan, stream=stream) as progress:
            model = load(str(folder), plan=plan, progress=progress)
        model.vramancer.free()
    assert piped.getvalue() == ""
    drawn = tty.getvalue()
    assert "load s0" in drawn and "load s1" in drawn and "tensors" in drawn


def test_run_reports_load_in_its_stats(tmp_path, capsys):
    from tests.models.tiny import chat_llama
    from vramancer.cli import main

    model, tok = chat_llama(num_hidden_layers=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rc = main(["run", str(folder), "-p", "hello", "-n", "2", "--devices", "rtx3060,rtx3060", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    load_stats = summary["load"]
    assert load_stats["bytes"] == sum(s["weights_bytes"] for s in summary["plan"]["stages"])
    assert load_stats["tensors"] > 0 and load_stats["seconds"] >= 0
