"""Generation with a split model: streamed text, prefill and decode speed, and out-of-memory errors
that name the device and the stage.

    result = generate_text(model, tokenizer, "Hello", max_new_tokens=32, emit=print_piece)
    result.decode_tokens_per_s, result.text

Prefill time runs from the call to the first new token; decode time from the first new token to the
last, over the tokens after the first (``TextStreamer``'s ``put`` marks each step).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import DeviceOutOfMemoryError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["GenerationResult", "generate_text", "generate_ids", "prompt_ids", "oom_error"]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 3)
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        return d


def oom_error(model: nn.Module, err: BaseException, doing: str) -> DeviceOutOfMemoryError:
    """A DeviceOutOfMemoryError naming the stage that ran when ``err`` was raised."""
    rt = getattr(model, "vramancer", None)
    st = rt.stage_of_device_error() if rt is not None else None
    if st is None:
        return DeviceOutOfMemoryError(f"out of memory while {doing}: {str(err).splitlines()[0]}")
    dev = st.plan.compute_device or st.plan.device
    return DeviceOutOfMemoryError(
        f"out of memory on {dev} in stage {st.index} (blocks {st.blocks[0]}-{st.blocks[1] - 1}) while "
        f"{doing}: use a shorter prompt or --max-new-tokens, or plan with a shorter --context, a larger "
        f"--reserve, or more --devices", device=dev, stage=st.index)


def _timing_streamer(tokenizer: Any, emit: Callable[[str], None] | None):
    from transformers import TextStreamer

    class TimingStreamer(TextStreamer):
        """TextStreamer that hands text to ``emit`` and notes when each step's tokens arrive."""

        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if emit is not None and text:
                emit(text)

    return TimingStreamer()


def prompt_ids(tokenizer: Any, prompt: str | list[dict], device: Any = None) -> dict:
    """Tokenized prompt (``input_ids``, ``attention_mask``); a list of chat messages goes through
    the tokenizer's chat template with the assistant's turn opened."""
    if isinstance(prompt, list):
        enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    else:
        enc = dict(tokenizer(prompt, return_tensors="pt"))
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    if device is not None:
        enc = {k: v.to(device) for k, v in enc.items()}
    return enc


def _sampling_processor(temperature: float, top_p: float | None, seed: int | None) -> Any:
    """A transformers LogitsProcessor that draws each row's next token with runtime/sampling.py's
    Sampler (temperature, top-p, its own generator seeded with ``seed``; row i of a batch with
    ``seed + i``) and leaves only that token's score: greedy decoding then takes it. One sampler for
    run, chat, serve and run --cluster (same seed, same logits: same tokens), and none of the
    generation config's other warpers (transformers' default top-k of 50) sneaks in."""
    import torch
    from transformers import LogitsProcessor

    from .sampling import Sampler, SamplingParams

    class SamplerProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.samplers: list[Sampler] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            while len(self.samplers) < scores.shape[0]:
                i = len(self.samplers)
                self.samplers.append(Sampler(SamplingParams(temperature=float(temperature),
                                                            top_p=1.0 if top_p is None else float(top_p),
                                                            seed=None if seed is None else seed + i)))
            picked = torch.full_like(scores, float("-inf"))
            for i, sampler in enumerate(self.samplers[:scores.shape[0]]):
                picked[i, sampler.sample(scores[i].float())] = 0.0
            return picked

    return SamplerProcessor()


def generate_ids(model: nn.Module, inputs: dict, max_new_tokens: int, temperature: float = 0.0,
                 streamer: Any = None, pad_token_id: int | None = None, *, top_p: float | None = None,
                 seed: int | None = None, **kwargs: Any):
    """``model.generate`` greedy (temperature 0) or sampled by runtime/sampling.py's Sampler
    (``temperature``, ``top_p``, ``seed``); out-of-memory becomes DeviceOutOfMemoryError naming the
    stage. A split model prefills in chunks of its plan's ``prefill_chunk`` tokens: the activation
    workspace the plan sized."""
    import torch
    from transformers import LogitsProcessorList

    gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, streamer=streamer)
    rt = getattr(model, "vramancer", None)
    if rt is not None and inputs["input_ids"].shape[-1] > rt.plan.workload.prefill_chunk:
        gen["prefill_chunk_size"] = rt.plan.workload.prefill_chunk
    gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if temperature and temperature > 0:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(_sampling_processor(temperature, top_p, seed))
        gen["logits_processor"] = processors
    if pad_token_id is not None:
        gen["pad_token_id"] = pad_token_id
    gen.update(kwargs)
    if rt is not None and "past_key_values" not in gen and "cache" not in gen:
        from .kvcache import kv_cache_for

        cache = kv_cache_for(model)   # the plan's --kv-dtype (None: transformers' own cache)
        if cache is not None:
            gen["cache"] = cache
    try:
        with torch.no_grad():
            return model.generate(**inputs, **gen)
    except torch.OutOfMemoryError as e:
        raise oom_error(model, e, "generating") from None


def generate_text(model: nn.Module, tokenizer: Any, prompt: str | list[dict], max_new_tokens: int = 64,
                  temperature: float = 0.0, emit: Callable[[str], None] | None = None,
                  **kwargs: Any) -> GenerationResult:
    """Generate from ``prompt`` (text, or chat messages), handing text pieces to ``emit`` as they come.
    ``top_p`` / ``seed`` (keywords) go with ``temperature`` to the Sampler (generate_ids)."""
    rt = getattr(model, "vramancer", None)
    # a split model's inputs go where its first stage runs (``model.device`` is its first parameter's,
    # a meta placeholder when that parameter streams from disk)
    inputs = prompt_ids(tokenizer, prompt, device=rt.input_device if rt is not None else getattr(model, "device", None))
    n_prompt = int(inputs["input_ids"].shape[-1])
    streamer = _timing_streamer(tokenizer, emit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = generate_ids(model, inputs, max_new_tokens, temperature, streamer=streamer, pad_token_id=pad, **kwargs)
    end = time.perf_counter()
    new = out[0, n_prompt:].tolist()
    times = streamer.times[1:]  # the first put is the prompt
    prefill = (times[0] - start) if times else end - start
    decode = (times[-1] - times[0]) if len(times) > 1 else 0.0
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(text=text, prompt_tokens=n_prompt, new_tokens=len(new), token_ids=new,
                            prefill_seconds=prefill, decode_seconds=decode)
