"""The split runtime: materialise a Plan and run it.

    loader.py      load(model, devices, plan) -> the model split and ready (``model.vramancer``)
    checkpoint.py  safetensors files read tensor by tensor into memory we own (pread, no full copy)
    layout.py      blocks (module prefixes from the profile) mapped onto the plan's stages
    split.py       SplitRuntime (hooks, attach / detach, memory report) and RuntimeStage
    boundary.py    moving activations and shared layer inputs at stage boundaries only
    stream.py      streamed offload: two slots, prefetch on a side stream / worker thread
    memory.py      measured bytes per stage next to the plan's
    generate.py    generation with streamed text, prefill / decode speed, OOM naming the stage
    demo_model.py  the demo's small Llama and tokenizer, built offline
    commands/      `vramancer run`, `chat`, `demo`

Nothing here is imported by ``import vramancer``; torch and transformers load when used.
"""
