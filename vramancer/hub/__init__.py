"""The Hugging Face bridge: Hub models as people publish them, fetched and converted for VRAMancer.

    vramancer pull org/name [--include-stage-of plan.json --stages 0]   # safetensors + config/tokenizer
    vramancer convert SRC DST [--dtype bf16] [--plan plan.json]         # .bin / GGUF / dtype / re-shard

``fetch`` decides what to download (and how much) from the remote config and safetensors headers;
``remote`` talks to the Hub through ``huggingface_hub`` ($HF_ENDPOINT, $HF_HUB_CACHE read at call
time); ``convert`` writes safetensors folders atomically. Layering: this package imports devices,
models, plan, errors and units, never the runtime, serve or ui; the runtime's commands import it.
"""
from __future__ import annotations

__all__: list[str] = []
