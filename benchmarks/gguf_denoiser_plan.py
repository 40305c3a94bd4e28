"""`vramancer plan` of a FLUX.1-dev-sized GGUF transformer, from its header alone: the GGUF header of
city96's layout (original BFL names, FLUX.1-dev's shapes: 3072 wide, 19 double and 38 single blocks,
guidance embedded) is written for Q8_0 and Q4_K, and the file is extended to its full length as a
sparse file (no tensor data written, no disk used), then planned on catalog cards at 1024x1024.
Prints the denoiser's resident bytes (quantized tensors as stored, F32/F16 ones in bfloat16), the
dequantized-layer transient, the file's tensor bytes, and the plan's stages per device.

Run:  python benchmarks/gguf_denoiser_plan.py [--devices SPEC] [--keep DIR]
Type rule (city96's, reduced): vectors F32; matrices whose rows are whole blocks of the type (32 for
Q8_0, 256 for Q4_K) in that type; the rest F16.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def flux_dev_shapes() -> dict[str, tuple[int, ...]]:
    """FLUX.1-dev's transformer tensors under BFL names (shapes from diffusers' model on the meta device)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from tests.pipeline.gguf_flux import bfl_state_dict

    with init_empty_weights():
        m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    sd = {k: torch.empty(v.shape, device="meta") for k, v in m.state_dict().items()}
    return {k: tuple(v.shape) for k, v in bfl_state_dict(sd).items()}


def write_header(path: Path, shapes: dict[str, tuple[int, ...]], quant: str) -> int:
    """The GGUF header of those tensors in ``quant``, the file extended (sparse) to its full length;
    returns the tensors' bytes."""
    import gguf
    import numpy as np

    qt = gguf.GGMLQuantizationType[quant]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    total = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if len(shape) == 1:
            t, nbytes, dt = gguf.GGMLQuantizationType.F32, 4 * n, np.float32
        elif shape[-1] % block == 0:
            t, nbytes, dt = qt, n // block * type_size, np.uint8
        else:
            t, nbytes, dt = gguf.GGMLQuantizationType.F16, 2 * n, np.float16
        byte_shape = list(shape[:-1]) + [shape[-1] // block * type_size] if t == qt else list(shape)
        w.add_tensor_info(name, byte_shape, np.dtype(dt), nbytes, raw_dtype=t)
        total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    alignment = 32
    size = os.path.getsize(path)
    data_end = -(-size // alignment) * alignment
    # each tensor padded to the alignment, as GGUFWriter lays them out
    os.truncate(path, data_end + sum(-(-b // alignment) * alignment for b in _sizes(shapes, quant)))
    return total


def _sizes(shapes: dict[str, tuple[int, ...]], quant: str) -> list[int]:
    import gguf
    import numpy as np

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    out = []
    for shape in shapes.values():
        n = int(np.prod(shape))
        out.append(4 * n if len(shape) == 1 else n // block * type_size if shape[-1] % block == 0 else 2 * n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="rtx3060:12GiB,rtx3060:12GiB,cpu:64GiB")
    ap.add_argument("--keep", default=None, help="write the headers here and keep them")
    args = ap.parse_args(argv)
    from vramancer.devices.spec import parse_devices
    from vramancer.models.pipeline import ImageWorkload, pipeline_profile
    from vramancer.plan.pipeline import plan_pipeline
    from vramancer.units import format_bytes

    shapes = flux_dev_shapes()
    root = Path(args.keep or tempfile.mkdtemp(prefix="gguf-plan-"))
    root.mkdir(parents=True, exist_ok=True)
    params = sum(math.prod(s) for s in shapes.values())
    print(f"FLUX.1-dev transformer: {len(shapes)} tensors, {params:,} parameters; devices {args.devices}")
    for quant in ("Q8_0", "Q4_K"):
        path = root / f"flux1-dev-{quant}.gguf"
        tensor_bytes = write_header(path, shapes, quant)
        prof = pipeline_profile(path)
        den = prof.denoiser_component
        plan = plan_pipeline(prof, parse_devices(args.devices), ImageWorkload(height=1024, width=1024, steps=28,
                                                                               cfg_doubles=False))
        print(f"\n{path.name}: file {format_bytes(os.path.getsize(path))} (sparse), tensors {tensor_bytes:,} B; "
              f"planned resident {den.weights_bytes:,} B ({den.stored}, F32/F16 in {den.dtype}); dequantized layer "
              f"{prof.dequant_bytes:,} B")
        for s in plan.stages:
            print(f"  stage {plan.blocks[s.blocks[0]].name} .. {plan.blocks[s.blocks[1] - 1].name} on {s.device} "
                  f"({s.mode}): weights {s.weights_bytes:,} B, workspace {s.activation_bytes:,} B")
        for p in plan.phase_peaks:
            if p.phase == "denoise":
                print(f"  denoise peak {p.device}: {format_bytes(p.bytes)} of {format_bytes(p.capacity_bytes)}")
        print(f"  fits: {plan.fits}; predicted {plan.image.seconds_per_image:.1f} s/image (denoiser only)")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
