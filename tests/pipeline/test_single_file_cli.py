"""`vramancer run` on a single-file checkpoint: the configs come from --pipeline-config DIR (nothing is
downloaded); without it, one line naming the flag, exit 2, nothing written."""
from __future__ import annotations

from tests.pipeline.test_profile import _write_safetensors
from vramancer.cli import main


def test_single_file_run_names_the_pipeline_config_flag(tmp_path, capsys, monkeypatch):
    sd15 = tmp_path / "sd15.safetensors"
    _write_safetensors(sd15, [
        ("model.diffusion_model.input_blocks.0.0.weight", (8, 4, 3, 3)),
        ("model.diffusion_model.middle_block.0.in_layers.0.weight", (8,)),
        ("model.diffusion_model.out.0.weight", (8,)),
        ("first_stage_model.decoder.conv_in.weight", (16, 4, 3, 3)),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (10, 8)),
    ])
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", str(sd15), "-p", "a cat", "--steps", "1", "--height", "64", "--width", "64",
                 "-d", "cpu", "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--pipeline-config DIR" in lines[0] and "StableDiffusionPipeline" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
