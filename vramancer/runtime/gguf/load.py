"""A GGUF file (llama.cpp) read for the split runtime, its weights kept quantized; the loader
(runtime/loader.py ``load`` / ``load_gguf``) builds the model with these pieces and places it.

    model = vramancer.load("model-Q4_K_M.gguf", devices="rtx3090,rtx3060")
    tok = load_gguf_tokenizer("model-Q4_K_M.gguf")          # tokenizer and chat template from the file

How, with transformers' own GGUF support for everything model-specific:
  * the config is what ``AutoConfig.from_pretrained(folder, gguf_file=...)`` reads from the metadata;
  * the model is built on meta (loader.build_empty_model) in the compute dtype;
  * GGUF tensor names map to the model's with ``get_gguf_hf_weights_map`` and the architecture's
    ``TensorProcessor``. A processor that reorders rows (Llama's q/k un-permutation) is run on a
    column of row indices to learn the permutation, which is then applied to the quantized rows (a
    row is whole blocks). A processor that changes the values of a quantized tensor cannot keep it
    quantized: the file is refused, naming the tensor. Float tensors (norms, biases) go through the
    processor as they are;
  * each weight's stored tensor (GGUF blocks as uint8, or floats in the file's dtype) replaces the
    meta parameter (modules.keep_gguf; ``keep_quantized``), then the loader's placement reads each
    one from the file (gguf.GGUFReader's memmap) onto its stage's device and attaches the runtime.
Resident weight memory per stage is the GGUF byte count of its tensors, which the plan of the file
(``vramancer plan file.gguf``) counts exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BadInputError, CheckpointMismatchError, MalformedCheckpointError
from .dequant import GGUFType, gguf_type

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

    from ...plan.plan import Plan

_log = logging.getLogger("vramancer.gguf")

__all__ = ["GGUFTensor", "GGUFFile", "is_gguf", "open_gguf", "gguf_model_config", "keep_quantized",
           "load_gguf_tokenizer", "compute_dtype", "plan_config", "check_plan_dtype", "loaded_note"]


def is_gguf(model: Any) -> bool:
    """Whether ``model`` names a .gguf file."""
    return isinstance(model, (str, Path)) and str(model).lower().endswith(".gguf") and Path(model).is_file()


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: ``shape`` in torch order (rows first), ``data`` its memory-mapped bytes."""

    name: str
    qtype: GGUFType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def read(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """The stored tensor (uint8 blocks ``[..., bytes_per_row]``, or floats in the file's dtype)
        in memory of its own, rows reordered by ``rows`` when given."""
        import numpy as np
        import torch

        from .modules import stored_dtype, stored_shape

        raw = np.asarray(self.data).view(np.uint8).reshape(stored_shape(self.qtype, self.shape)[:-1] + (-1,))
        if rows is not None:
            raw = raw[rows]
        out = torch.from_numpy(np.array(raw, copy=True))
        return out.view(stored_dtype(self.qtype)).reshape(stored_shape(self.qtype, self.shape))


@dataclass
class GGUFFile:
    path: Path
    parts: list[Path]
    arch: str
    tensors: dict[str, GGUFTensor]
    readers: list[Any]


def open_gguf(path: str | Path) -> GGUFFile:
    """The tensors of a GGUF file and its split parts (``-00001-of-00003.gguf``), memory-mapped."""
    from gguf import GGUFReader

    from ...models.gguf_file import read_gguf

    path = Path(path)
    fields, headers = read_gguf(path)           # validates the header; names missing split parts
    parts = sorted({Path(h.file) for h in headers}) or [path]
    readers, tensors = [], {}
    for part in parts:
        try:
            reader = GGUFReader(str(part), "r")
        except Exception as e:  # noqa: BLE001 - GGUFReader raises many kinds on bad bytes
            raise MalformedCheckpointError(f"malformed GGUF file {part}: {type(e).__name__}: {e}") from None
        readers.append(reader)
        for t in reader.tensors:
            name = str(t.name)
            try:
                qtype = gguf_type(t.tensor_type)
            except BadInputError:
                raise BadInputError(f"{path.name}: tensor {name} is {t.tensor_type.name}, which is not supported "
                                    "(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K are)") from None
            shape = tuple(int(s) for s in reversed(list(t.shape)))
            tensors[name] = GGUFTensor(name, qtype, shape, t.data)
    return GGUFFile(path, parts, str(fields["general.architecture"]), tensors, readers)


def gguf_model_config(path: str | Path) -> Any:
    """The transformers config transformers reads from the file's metadata; BadInputError naming the
    architecture when transformers cannot load it."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from ...models.gguf_file import read_gguf

    path = Path(path)
    fields, _ = read_gguf(path)
    arch = str(fields["general.architecture"])
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise BadInputError(f"{path.name}: GGUF architecture {arch} is not supported "
                            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path.name}: transformers cannot read a {arch} config from it "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    # llama.cpp writes the head size as attention.key_length (convert_hf_to_gguf.py, whenever the
    # config has head_dim); transformers does not read it for every architecture (Qwen3 keeps its
    # default of 128), so a model whose heads are not hidden / n_head would be built wrong
    experts = int(fields.get(f"{arch}.expert_count") or 0)
    if arch == "llama" and experts:
        # llama.cpp writes Mixtral as "llama" with stacked ffn_{gate,up,down}_exps tensors, from which
        # transformers would build a dense Llama: the same config as a Mixtral with its experts
        from transformers import MixtralConfig

        d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        d.update(num_local_experts=experts, num_experts_per_tok=int(fields.get(f"{arch}.expert_used_count") or 2))
        config = MixtralConfig(**d)
    key_length = fields.get(f"{arch}.attention.key_length")
    if key_length is not None and getattr(config, "head_dim", None) not in (None, int(key_length)):
        config.head_dim = int(key_length)
    return config


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer (and chat template) stored in the file's metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path.name}: no usable tokenizer in the GGUF metadata "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def compute_dtype(dtype: str | None, plan: Plan) -> torch.dtype:
    """The dtype weights are dequantized to and activations run in: ``dtype`` when given (a float
    dtype), else float32 when every stage computes on the CPU and bfloat16 when one is a GPU."""
    import torch

    from ...errors import WorkloadError
    from ...models.dtypes import resolve_dtype

    if dtype is not None:
        d = resolve_dtype(dtype)
        if d.quantized or d.name not in ("float32", "float16", "bfloat16"):
            raise WorkloadError(f"a GGUF file computes in float32, float16 or bfloat16, not {d.name} "
                                "(its weights stay as the file stores them)")
        return getattr(torch, d.name)
    devs = {d.id: d for d in plan.devices}
    names = [st.torch_device for st in plan.stages]
    names += [devs[st.compute_device].torch_device for st in plan.stages
              if st.compute_device and st.compute_device in devs]
    return torch.bfloat16 if any(str(n).startswith("cuda") for n in names) else torch.float32


# ------------------------------------------------------------------------------------------------
def _row_permutation(processor: Any, t: GGUFTensor) -> np.ndarray | None:
    """The rows the architecture's processor reorders ``t`` into (learnt from a column of row
    indices), None when it keeps them; BadInputError when it changes more than the row order."""
    import numpy as np

    rows = t.shape[0]
    probe = np.arange(rows, dtype=np.float64).reshape(rows, *([1] * (len(t.shape) - 1)))
    try:
        out = processor.process(weights=probe.copy(), name=t.name, tensor_key_mapping=None, parsed_parameters=None)
        got = np.asarray(out.weights)
        ok = out.name == t.name and got.shape == probe.shape
        perm = got.reshape(rows).astype(np.int64) if ok else None
        ok = ok and np.array_equal(got.reshape(rows), perm) and np.array_equal(np.sort(perm), np.arange(rows))
    except Exception:  # noqa: BLE001 - a processor that cannot take a probe changes more than rows
        ok, perm = False, None
    if not ok:
        raise BadInputError(f"tensor {t.name} ({t.qtype.name}) needs a value conversion for "
                            f"{type(processor).__name__}; it cannot stay quantized")
    return None if np.array_equal(perm, np.arange(rows)) else perm


class _Read:
    """Source of one stored tensor (for every model name that shares it): read when placed."""

    def __init__(self, t: GGUFTensor, names: list[str], rows: np.ndarray | None, processor: Any):
        self.t, self.names, self.rows, self.processor = t, names, rows, processor

    def __call__(self) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        from .dequant import dequantize

        if self.processor is None:
            out = self.t.read(self.rows)
        else:  # a float tensor through the architecture's processor, as transformers loads it
            stored = self.t.read()
            values = dequantize(stored.contiguous().view(torch.uint8).reshape(*stored.shape[:-1], -1), self.t.qtype)
            res = self.processor.process(weights=values.numpy(), name=self.t.name, tensor_key_mapping=None,
                                         parsed_parameters=None)
            out = torch.from_numpy(np.array(res.weights, dtype=np.float32, copy=True)).to(stored.dtype)
            out = out.reshape(stored.shape)
        return {n: out for n in self.names}


_GATE_UP = __import__("re").compile(r"blk\.\d+\.ffn_(?P<w>gate|up)_exps\.weight")


def _stacked_experts(base: type) -> type:
    """``base`` (an architecture's TensorProcessor) that also maps llama.cpp's stacked experts
    (ffn_{gate,up,down}_exps, ffn_gate_inp) to transformers' fused MoE parameters, as its Qwen2-MoE
    processor does."""
    from transformers.modeling_gguf_pytorch_utils import Qwen2MoeTensorProcessor as Moe

    return type(f"{base.__name__}WithExperts", (base,), {
        "HF_EXPERT_RENAME_PATTERN": Moe.HF_EXPERT_RENAME_PATTERN, "HF_MOE_W13_PATTERN": Moe.HF_MOE_W13_PATTERN,
        "preprocess_name": Moe.preprocess_name, "perform_fallback_tensor_mapping": Moe.perform_fallback_tensor_mapping})


def _stack_gate_up(gate: GGUFTensor, up: GGUFTensor) -> Any:
    """The stacked tensor of ``gate`` and ``up``; of different types (llama.cpp's Q4_K_M, ...): a
    stacked.MixedGateUp, its rows' bytes side by side."""
    from .stacked import MixedGateUp, SameTypeGateUp

    if gate.qtype != up.qtype and gate.shape == up.shape and len(gate.shape) == 3:
        e, rows, cols = gate.shape
        return MixedGateUp(f"{gate.name}+{up.name}", (e, 2 * rows, cols), gate, up)
    if gate.qtype != up.qtype or gate.shape != up.shape or len(gate.shape) != 3:
        raise BadInputError(f"{gate.name} ({gate.qtype.name} {list(gate.shape)}) and {up.name} ({up.qtype.name} "
                            f"{list(up.shape)}) differ: they cannot be stacked into one experts tensor")
    e, rows, cols = gate.shape
    return SameTypeGateUp(f"{gate.name}+{up.name}", (e, 2 * rows, cols), gate, up)


def keep_quantized(model: nn.Module, gf: GGUFFile, dtype: torch.dtype) -> dict[str, Callable[[], dict]]:
    """Swap every weight of ``model`` (on meta) the file holds for its stored GGUF tensor
    (modules.keep_gguf), read back as ``dtype``. Returns, by model state name, the reader of each
    stored tensor (a callable giving {state name: tensor} for every name sharing it).
    CheckpointMismatchError lists what does not match."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from .modules import DequantScratch, keep_gguf, stored_dtype

    parsed = load_gguf_checkpoint(str(gf.parts[0]), return_tensors=False)
    processor_class = TENSOR_PROCESSORS.get(gf.arch, TensorProcessor)
    if gf.arch == "llama" and getattr(model.config, "model_type", "") == "mixtral":
        processor_class = _stacked_experts(processor_class)
    processor = processor_class(config=parsed.get("config", {}))
    try:
        name_map = get_gguf_hf_weights_map(model, processor, model_type=gf.arch)
    except NotImplementedError:
        raise BadInputError(f"{gf.path.name}: gguf-py has no tensor names for architecture {gf.arch}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    ties: dict[int, list[str]] = {}
    for n, p in params.items():
        ties.setdefault(id(p), []).append(n)
    group_of = {n: ties[id(p)] for n, p in params.items()}
    sources: dict[str, Any] = {}
    scratch = DequantScratch()      # one for the model: its CPU weights are dequantized into it
    done: set[str] = set()
    unexpected, mismatched = [], []
    merged: dict[str, dict[str, GGUFTensor]] = {}
    for gname, t in gf.tensors.items():
        hf = name_map.get(gname) or name_map.get(gname.removesuffix(".weight"))   # stacked experts: no suffix
        m = _GATE_UP.fullmatch(gname)
        if m and hf in params and hf.endswith("gate_up_proj"):
            merged.setdefault(hf, {})[m["w"]] = t         # gate and up rows stacked into one parameter
            if len(merged[hf]) < 2:
                continue
            t = _stack_gate_up(merged[hf]["gate"], merged[hf]["up"])
        if hf is None or hf not in params:
            unexpected.append(gname)
            continue
        if hf in done:
            continue
        meta = params[hf]
        n_values = 1
        for s in t.shape:
            n_values *= s
        if n_values != meta.numel() or t.shape[-1] != meta.shape[-1]:
            mismatched.append(f"{gname} {list(t.shape)} vs {hf} {list(meta.shape)}")
            continue
        names = group_of[hf]
        done.update(names)
        if not hasattr(t, "qtype"):              # gate and up experts of different types (stacked.py)
            from .stacked import keep_gate_up

            state_names, shared = [], None
            for n in names:
                sname, shared = keep_gate_up(model, n, t, dtype, stored=shared)
                state_names.append(sname)
            fn = _Read(t, state_names, None, None)
            for sn in state_names:
                sources[sn] = fn
            continue
        stored_dt = stored_dtype(t.qtype)
        if t.qtype.quantized:
            rows, proc = _row_permutation(processor, t), None
        else:
            rows, proc = None, processor
        if stored_dt == dtype and tuple(t.shape) == tuple(meta.shape):
            state_names = names                       # a plain parameter in the compute dtype
        else:
            state_names, shared = [], None
            for n in names:
                sname, shared = keep_gguf(model, n, t.qtype, dtype, stored=shared, scratch=scratch)
                state_names.append(sname)
        fn = _Read(t, state_names, rows, proc if type(processor) is not TensorProcessor else None)
        for sn in state_names:
            sources[sn] = fn
    missing = [n for n in params if n not in done]
    if unexpected and not missing and not mismatched:
        # as transformers loads a GGUF: tensors the model has no place for (llama.cpp's
        # rope_freqs, ...) are left unread once every parameter has its tensor
        _log.warning("%s: %d tensors %s does not use, left unread: %s", gf.path.name, len(unexpected),
                     type(model).__name__, ", ".join(unexpected[:8]))
        unexpected = []
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:8])}{more}")
        raise CheckpointMismatchError(f"{gf.path.name} does not match {type(model).__name__} "
                                      f"({gf.arch}): " + "; ".join(parts), missing=missing, unexpected=unexpected)
    return sources


def plan_config(path: str | Path) -> dict:
    """The config a plan of this file was made from (models.gguf_file), for the plan's identity check."""
    from ...models.gguf_file import gguf_config, read_gguf

    fields, headers = read_gguf(Path(path))
    return gguf_config(fields, headers)


def check_plan_dtype(plan: Plan, path: str | Path) -> None:
    """Refuse a plan that sized this file's weights in another dtype than the file stores (a plan
    made with ``--dtype``): the runtime keeps the file's blocks, so that plan's bytes would be wrong."""
    from ...models.dtypes import resolve_dtype
    from ...models.gguf_file import profile_from_gguf

    stored = profile_from_gguf(Path(path)).dtype
    planned = plan.workload.dtype
    if resolve_dtype(planned).name != resolve_dtype(stored).name:
        raise BadInputError(f"the plan sizes {Path(path).name} as {planned}, but its weights stay as stored "
                            f"({stored}): plan it without --dtype")


def loaded_note(gf: GGUFFile, dtype: torch.dtype) -> str:
    return f"GGUF {gf.arch} weights kept quantized, dequantized to {str(dtype).removeprefix('torch.')} per layer"
