"""Profiles of torch modules: a plain ``nn.Module`` (counted from its parameters), and the
fallback for a transformers ``model_type`` outside the architecture table (the model built on
the ``meta`` device from its config, then counted the same way).

The repeated layers are the largest ``nn.ModuleList`` (by parameters); what is registered before
it along the path from the root is block 0 (modules holding only buffers, such as rotary
embeddings, too), what comes after is the last block. Tied parameters are found by identity and
listed as ``shared`` on every block that uses them. torch / transformers are imported inside the
functions only.
"""
from __future__ import annotations

from typing import Any

from ..errors import UnknownModelError, VramancerError
from .arch import config_dtype, layer_windows
from .dtypes import DType, resolve_dtype
from .layout import ArchLayout, BlockLayout, TensorSpec, assemble_profile
from .profile import ModelProfile

__all__ = ["layout_from_module", "profile_from_module", "layout_from_meta", "profile_from_meta",
           "attention_figures"]


def _first(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        v = cfg.get(k)
        if v is not None and not isinstance(v, bool):
            return v
    return default


def attention_figures(config: dict) -> dict[str, Any]:
    """Per-layer attention sizes read from any transformers config dict (the text config of a
    multimodal one): hidden, heads, kv elements per token (2 x kv_heads x head_dim, or for
    DeepSeek-style MLA what transformers caches: heads x (qk_nope + qk_rope + v_head_dim)),
    MLP intermediate, layer count, vocabulary and per-layer windows."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    H = int(_first(cfg, "hidden_size", "n_embd", "d_model", "dim", default=0) or 0)
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads", default=0) or 0)
    kvh = _first(cfg, "num_key_value_heads")
    if kvh is None and cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
        kvh = 1  # MQA (Falcon-7B, GPT-BigCode): one K/V head whatever num_kv_heads says
    if kvh is None:
        kvh = _first(cfg, "num_kv_heads", "n_kv_heads", "n_head_kv", default=heads)
    hd = int(_first(cfg, "head_dim", "attention_head_size", default=(H // heads if heads else 0)) or 0)
    if cfg.get("qk_nope_head_dim") is not None and cfg.get("v_head_dim") is not None:
        qk = int(cfg["qk_nope_head_dim"]) + int(cfg.get("qk_rope_head_dim") or 0)
        kv_elems = heads * (qk + int(cfg["v_head_dim"]))
        attn_flops = 2.0 * heads * (qk + int(cfg["v_head_dim"]))
    else:
        kv_elems = 2 * int(kvh) * hd
        attn_flops = 4.0 * heads * hd
    L = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0) or 0)
    return {
        "hidden": H, "heads": heads, "kv_heads": int(kvh), "head_dim": hd, "kv_elems": kv_elems,
        "attn_flops": attn_flops,
        "intermediate": int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size",
                                   default=4 * H) or 4 * H),
        "layers": L,
        "vocab": int(_first(cfg, "vocab_size", default=0) or 0),
        "max_positions": _first(cfg, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
        "windows": layer_windows(str(cfg.get("model_type") or config.get("model_type") or ""), cfg, L),
        "expert_fraction": _expert_fraction(cfg),
    }


def _expert_fraction(cfg: dict) -> float:
    k = _first(cfg, "num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
    e = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if k and e:
        return float(k) / float(e)
    return 1.0


def _find_layers(module: Any) -> tuple[str, Any] | None:
    """The ModuleList holding the most parameters (name, list), or None."""
    import torch

    best: tuple[int, int, str, Any] | None = None
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and name:
            n = sum(p.numel() for p in m.parameters())
            key = (n, len(m))
            if n > 0 and (best is None or key > best[:2]):
                best = (n, len(m), name, m)
    return None if best is None else (best[2], best[3])


def _side_prefixes(module: Any, layers_path: str) -> tuple[list[str], list[str]]:
    """Module / parameter names along the path to the layer list: those registered before it
    (plus buffer-only modules) and those after it."""
    before: list[str] = []
    after: list[str] = []
    parts = layers_path.split(".")
    node, prefix = module, ""
    for part in parts:
        seen_path = False
        level_after: list[str] = []
        for pname, _ in node.named_parameters(recurse=False):
            before.append(prefix + pname)
        for bname, _ in node.named_buffers(recurse=False):
            before.append(prefix + bname)
        for cname, child in node.named_children():
            if cname == part:
                seen_path = True
                continue
            has_params = any(True for _ in child.parameters())
            has_buffers = any(True for _ in child.buffers())
            if not has_params and not has_buffers:
                continue
            if not has_params or not seen_path:
                before.append(prefix + cname)
            else:
                level_after.append(prefix + cname)
        after = level_after + after  # what an inner level runs after the layers comes first
        node = getattr(node, part)
        prefix = prefix + part + "."
    return before, after


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layout_from_module(module: Any, *, config: dict | None = None, exact: bool = True,
                       kind: str | None = None) -> ArchLayout:
    """The block layout of a torch module. ``exact``: tensors carry their bytes as they are in
    memory (numel x element size); otherwise they are sized later in the profile's dtype.
    ``config``: a transformers config dict for KV / attention figures (read from
    ``module.config`` when not given)."""
    import torch

    if config is None and hasattr(getattr(module, "config", None), "to_dict"):
        config = module.config.to_dict()
    fig = attention_figures(config) if config else None
    if kind is None:
        can_generate = getattr(module, "can_generate", None)
        kind = "causal-lm" if callable(can_generate) and can_generate() else "encoder"

    # identity -> all names (tied weights share one Parameter)
    names_of: dict[int, list[str]] = {}
    params: dict[int, Any] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
        params[id(p)] = p
    embed_ids = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    head_ids: set[int] = set()
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:
            out = None
        if out is not None and getattr(out, "weight", None) is not None:
            head_ids.add(id(out.weight))

    found = _find_layers(module)
    notes: list[str] = []
    if found is None:
        layers_prefix, n_layers = "", 0
        before, after = [n for n, _ in module.named_children()], []
        notes.append("no repeated layers (nn.ModuleList) found: the whole module is one block")
    else:
        layers_prefix, layer_list = found
        n_layers = len(layer_list)
        before, after = _side_prefixes(module, layers_prefix)

    def block_of(name: str) -> int:
        if layers_prefix and name.startswith(layers_prefix + "."):
            idx = name[len(layers_prefix) + 1:].split(".", 1)[0]
            if idx.isdigit():
                return int(idx) + 1
        if _under(name, after):
            return n_layers + 1
        return 0

    nblocks = n_layers + 2 if found is not None else 1
    tensors: list[list[TensorSpec]] = [[] for _ in range(nblocks)]
    shared: list[list[TensorSpec]] = [[] for _ in range(nblocks)]
    tied_key = None
    for pid, names in names_of.items():
        p = params[pid]
        shape = tuple(int(s) for s in p.shape)
        nbytes = int(p.numel()) * int(p.element_size()) if exact else None
        blocks = sorted({min(block_of(n), nblocks - 1) for n in names})

        def role(block: int, pid: int = pid, shape: tuple = shape, names: list = names) -> str:
            if pid in head_ids and (block == nblocks - 1 or pid not in embed_ids):
                return "head"
            if pid in embed_ids:
                return "embed"
            if len(shape) >= 3 or ".experts." in names[0]:
                return "expert"
            return "matrix" if len(shape) >= 2 else "vector"

        if len(blocks) == 1:
            tensors[blocks[0]].append(TensorSpec(names[0], shape, role(blocks[0]), nbytes))
        else:
            tied_key = tied_key or names[0]
            for b in blocks:
                shared[b].append(TensorSpec(names[0], shape, role(b), nbytes))

    H = fig["hidden"] if fig else 0
    vocab = fig["vocab"] if fig else 0
    if not vocab:
        for pid in embed_ids | head_ids:
            if pid in params and params[pid].dim() == 2:
                vocab = max(vocab, int(params[pid].shape[0]))
    blocks_out: list[BlockLayout] = []
    for i in range(nblocks):
        if found is None:
            name, modules = type(module).__name__, before
        elif i == 0:
            name, modules = (before[0] if before else "embed"), before
        elif i == nblocks - 1:
            name, modules = (after[-1] if after else "head"), after
        else:
            name = f"{layers_prefix}.{i - 1}"
            modules = [name]
        b = BlockLayout(name, list(modules), tensors[i], shared[i])
        if found is not None and 0 < i < nblocks - 1:
            # out features of every 2-D weight (each matmul output is live once; 3-D fused experts:
            # the active experts' outputs) + residual + normed input
            frac = fig["expert_fraction"] if fig else 1.0
            outs = sum(t.shape[0] for t in b.tensors if len(t.shape) == 2)
            outs += sum(int(round(t.shape[0] * frac)) * t.shape[1] for t in b.tensors if len(t.shape) == 3)
            b.act_elems_per_token = outs + 2 * H
            if fig:
                b.kv_elems_per_token = fig["kv_elems"] if kind == "causal-lm" else 0
                w = fig["windows"]
                b.kv_window = w[i - 1] if i - 1 < len(w) else None
                b.score_heads = fig["heads"]
                b.attn_flops_per_token_per_ctx = fig["attn_flops"]
                b.expert_fraction = frac
        elif i == nblocks - 1 and found is not None:
            b.act_elems_per_token = H
            b.logits_elems_per_token = vocab if kind == "causal-lm" else 0
        else:
            b.act_elems_per_token = H
        blocks_out.append(b)
    if not fig:
        notes.append("no transformers config: KV cache and attention figures unknown (0)")
    return ArchLayout(
        model_type=str((config or {}).get("model_type") or type(module).__name__),
        kind=kind,  # type: ignore[arg-type]
        layers_prefix=layers_prefix,
        blocks=blocks_out,
        hidden_size=H,
        num_layers=n_layers,
        vocab_size=vocab,
        max_position_embeddings=fig["max_positions"] if fig else None,
        tied_key=tied_key,
        config=config,
        notes=notes,
    )


def _dominant_dtype(module: Any) -> DType:
    sizes: dict[str, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            key = str(p.dtype).replace("torch.", "")
            sizes[key] = sizes.get(key, 0) + p.numel()
    for name in sorted(sizes, key=lambda k: -sizes[k]):
        try:
            return resolve_dtype(name)
        except VramancerError:
            continue
    return resolve_dtype("float32")


def profile_from_module(module: Any, dtype: str | None = None, *, name: str | None = None) -> ModelProfile:
    """Profile of an ``nn.Module``: bytes as held in memory (dtype None) or sized in ``dtype``."""
    layout = layout_from_module(module, exact=dtype is None)
    dt = _dominant_dtype(module) if dtype is None else resolve_dtype(dtype)
    return assemble_profile(layout, dt, name=name or type(module).__name__, source="module")


def layout_from_meta(config: dict, origin: str = "config") -> ArchLayout:
    """Build the transformers model for ``config`` on the meta device (no memory, no weights)
    and lay it out: AutoModelForCausalLM, or AutoModel for encoders."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise VramancerError(f"profiling model_type {config.get('model_type')!r} ({origin}) needs torch and "
                             f"transformers (pip install 'vramancer[runtime]'): {e}") from None
    mt = config.get("model_type")
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(mt, **kwargs)
    except (ValueError, KeyError) as e:
        raise UnknownModelError(f"unknown model_type {mt!r} in {origin}: neither in VRAMancer's architecture "
                                f"table nor known to transformers {transformers.__version__} ({e})") from None
    kind = "causal-lm"
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError:
            kind = "encoder"
            try:
                model = transformers.AutoModel.from_config(cfg)
            except ValueError as e:
                raise UnknownModelError(f"model_type {mt!r} in {origin}: transformers has no model class "
                                        f"for it ({e})") from None
    layout = layout_from_module(model, config=dict(config), exact=False, kind=kind)
    layout.model_type = str(mt)
    layout.notes.append(f"{mt} is not in the architecture table: laid out from the transformers model "
                        f"{type(model).__name__} built on the meta device")
    return layout


def profile_from_meta(config: dict, dtype: str | None = None, *, name: str | None = None,
                      source: str = "meta", path: str | None = None, origin: str = "config") -> ModelProfile:
    """Profile of any transformers architecture from its config (the meta-device fallback)."""
    layout = layout_from_meta(config, origin)
    dtype = dtype or config_dtype(config) or "float32"
    return assemble_profile(layout, resolve_dtype(dtype), name=name or str(config.get("model_type")),
                            source=source, path=path)
