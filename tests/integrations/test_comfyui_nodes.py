"""The ComfyUI integration without ComfyUI: ``vramancer comfyui install`` (refusals, idempotence),
the node classes' declarations, the planner on a denoiser module's blocks, the VRAM report's runs,
and that ``import vramancer`` imports neither ComfyUI nor the integration."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vramancer import parse_devices
from vramancer.errors import BadInputError
from vramancer.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
from vramancer.integrations.comfyui.commands import LOADER_MARKER, install
from vramancer.integrations.comfyui.report import PhaseTracker


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramancer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def _tree(root, kind: str = "tree"):
    (root / "custom_nodes").mkdir(parents=True)
    if kind == "tree":
        (root / "main.py").write_text("")
        (root / "comfy").mkdir()
    else:
        (root / "models").mkdir()
    return root


def test_install_writes_the_loader_and_is_idempotent(tmp_path):
    root = _tree(tmp_path / "ComfyUI")
    done = _cli("comfyui", "install", str(root))
    assert done.returncode == 0, done.stderr
    loader = root / "custom_nodes" / "vramancer" / "__init__.py"
    text = loader.read_text()
    assert LOADER_MARKER in text and "import vramancer.integrations.comfyui" in text
    compile(text, str(loader), "exec")
    assert done.stdout.startswith("installed: ")
    again = _cli("comfyui", "install", str(root))
    assert again.returncode == 0 and again.stdout.startswith("already installed: ")
    assert loader.read_text() == text
    assert sorted(p.name for p in (root / "custom_nodes" / "vramancer").iterdir()) == ["__init__.py"]


def test_install_into_a_base_directory(tmp_path):
    root = _tree(tmp_path / "base", kind="base")
    path, changed = install(root)
    assert changed and path == root / "custom_nodes" / "vramancer" / "__init__.py"


@pytest.mark.parametrize("make", ["missing", "empty", "no-custom-nodes", "file"])
def test_install_refuses_what_is_not_comfyui(tmp_path, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "no-custom-nodes":
        target.mkdir()
        (target / "main.py").write_text("")
        (target / "comfy").mkdir()
    elif make == "file":
        target.write_text("not a folder")
    done = _cli("comfyui", "install", str(target))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("vramancer: error: ")
    assert "Traceback" not in done.stderr
    if make in ("missing", "file"):
        assert ("not a folder" if make == "file" else "no such folder") in done.stderr
    if target.is_dir():
        assert not (target / "custom_nodes" / "vramancer").exists()


def test_install_never_overwrites_a_foreign_folder(tmp_path):
    root = _tree(tmp_path / "ComfyUI")
    theirs = root / "custom_nodes" / "vramancer"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("# someone else's nodes\n")
    with pytest.raises(BadInputError, match="was not written by vramancer"):
        install(root)
    assert (theirs / "__init__.py").read_text() == "# someone else's nodes\n"


def test_import_vramancer_imports_no_comfy():
    code = ("import sys, vramancer; vramancer.parse_devices('rtx3060'); "
            "print(sorted(m for m in sys.modules if m.startswith(('comfy', 'vramancer.integrations', 'torch'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_node_declarations():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {
        "VRAMancerSplitModel", "VRAMancerClipToDevice", "VRAMancerVaeToDevice", "VRAMancerVramReport"}
    for cls in NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert "required" in spec
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY == "VRAMancer"
    split = NODE_CLASS_MAPPINGS["VRAMancerSplitModel"]
    assert split.INPUT_TYPES()["required"]["model"] == ("MODEL",)
    assert split.RETURN_TYPES == ("MODEL", "STRING")
    assert NODE_CLASS_MAPPINGS["VRAMancerVramReport"].OUTPUT_NODE is True
    import os

    assert os.path.isfile(os.path.join(WEB_DIRECTORY, "vramancer.js"))


def _unet_like():
    """A module named like ComfyUI's UNetModel: time_embed, input_blocks.N, middle_block, output_blocks.N, out."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Module()
    m.time_embed = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 32))
    m.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 16, 3, padding=1)) for _ in range(3)])
    m.middle_block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16))
    m.output_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(32, 16, 3, padding=1)) for _ in range(3)])
    m.out = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))
    return m


def test_module_profile_and_plan_over_two_simulated_gpus():
    from vramancer.integrations.comfyui.split import plan_split, plan_text
    from vramancer.models.pipeline import module_denoiser_profile

    m = _unet_like()
    prof = module_denoiser_profile(m, "unet")
    names = [b.name for b in prof.blocks]
    # ComfyUI calls the middle block's layers one by one: each is a block of its own
    assert names == ["embed", "input_blocks.0", "input_blocks.1", "input_blocks.2", "middle_block.0",
                     "middle_block.1", "output_blocks.0", "output_blocks.1", "output_blocks.2", "final"]
    assert prof.blocks[0].modules == ["time_embed"] and prof.blocks[-1].modules == ["out"]
    exact = sum(p.numel() * p.element_size() for p in m.parameters())
    assert prof.weights_bytes == exact
    plan = plan_split(m, "rtx3060:2GiB,rtx3060:2GiB", height=64, width=64, split="1,1", name="unet")
    ids = [d.id for d in parse_devices("rtx3060:2GiB,rtx3060:2GiB")]
    assert [s.device for s in plan.stages] == ids
    assert sum(s.weights_bytes for s in plan.stages) == exact
    assert plan.workload.batch == 2      # classifier-free guidance
    text = plan_text(plan, exact, 64, 64)
    assert f"stage 0: {ids[0]}" in text and f"stage 1: {ids[1]}" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=100), "multiple of 16"), (dict(width=0), "multiple of 16"), (dict(batch=0), "batch"),
    (dict(split="1,x"), "--split"), (dict(devices="nosuchgpu"), "nosuchgpu"),
])
def test_plan_split_bad_input_is_one_clear_error(kwargs, match):
    from vramancer.integrations.comfyui.split import plan_split

    args = dict(devices="rtx3060,rtx3060", height=64, width=64)
    args.update(kwargs)
    with pytest.raises(BadInputError, match=match):
        plan_split(_unet_like(), args.pop("devices"), **args)


def test_report_keeps_the_last_run():
    import torch

    t = PhaseTracker()
    assert "nothing recorded" in t.report()
    cpu = [torch.device("cpu")]
    with t.phase("encode", cpu):
        pass
    for _ in range(3):
        with t.phase("denoise", cpu, held=lambda: {"gpu#0": 1024}, planned={"gpu#0": (1024, 512)}):
            pass
    with t.phase("decode", cpu):
        pass
    text = t.report()
    assert text.startswith("VRAMancer report, run 1")
    held = [ln for ln in text.splitlines() if "gpu#0" in ln]
    assert len(held) == 1 and "1.0 KiB" in held[0] and "[3 calls]" in held[0]
    with t.phase("denoise", cpu, held=lambda: {"gpu#0": 2048}):   # after decode: a new run
        pass
    text = t.report()
    assert text.startswith("VRAMancer report, run 2") and "encode" not in text and "2.0 KiB" in text


def test_controlnet_residuals_go_where_their_hidden_states_are():
    """UNet: apply_control pops each list from its end; the skip of output block j comes from input
    block n-1-j. Stage 1 is on the meta device here, so every move is visible without a GPU."""
    import torch
    from torch import nn

    from vramancer.integrations.comfyui.split import SplitState, StageRun, _is_control

    cpu, meta = torch.device("cpu"), torch.device("meta")
    stages = [StageRun(0, "a", cpu, cpu, "execute", ["time_embed", "input_blocks.0", "input_blocks.1"]),
              StageRun(1, "b", meta, meta, "execute", ["input_blocks.2", "middle_block.0", "middle_block.1",
                                                        "output_blocks.0", "output_blocks.1", "output_blocks.2"])]
    state = SplitState(None, stages, 0, "")
    dm = nn.Module()
    dm.input_blocks = nn.ModuleList([nn.Identity() for _ in range(3)])
    c = {name: [torch.zeros(1) for _ in range(3)] for name in ("input", "output")}
    c["middle"] = [torch.zeros(1)]
    assert _is_control(c) and not _is_control({"transformer_index": 0}) and not _is_control({})
    out = state.control_on_devices(dm, c)
    assert [t.device for t in out["input"]] == [meta, cpu, cpu]     # the last one is popped first (block 0)
    assert [t.device for t in out["output"]] == [cpu, cpu, meta]    # output block 0's skip: input block 2
    assert [t.device for t in out["middle"]] == [meta]
    assert all(t.device == cpu for v in c.values() for t in v)       # the caller's dict is left as it was
    flux = nn.Module()
    flux.double_blocks = nn.ModuleList([nn.Identity()])
    state = SplitState(None, [StageRun(0, "a", cpu, cpu, "execute", ["double_blocks.0"]),
                              StageRun(1, "b", meta, meta, "execute", ["single_blocks.0"])], 0, "")
    out = state.control_on_devices(flux, {"input": [torch.zeros(1)], "output": [torch.zeros(1)]})
    assert out["input"][0].device == cpu and out["output"][0].device == meta


def test_a_shared_tensor_crosses_once_unless_changed_in_place():
    import torch

    from vramancer.integrations.comfyui.split import _move
    from vramancer.runtime.boundary import BoundaryStats

    memo: dict = {}
    stats = BoundaryStats()
    meta = torch.device("meta")
    emb = torch.zeros(4)
    first = _move((emb, [emb]), meta, memo, stats)
    assert first[0] is first[1][0] and first[0].device == meta and stats.copied_bytes == 16
    assert _move(emb, meta, memo, stats) is first[0] and stats.copied_bytes == 16
    emb += 1      # a residual added in place after the move: copied again
    assert _move(emb, meta, memo, stats) is not first[0] and stats.copied_bytes == 32
    opts = {"sigmas": torch.zeros(1)}
    assert _move(opts, meta, memo, stats) is opts      # transformer_options pass through untouched
