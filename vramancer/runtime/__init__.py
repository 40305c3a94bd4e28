"""The split runtime: materialise a Plan and run it.

    loader.py      load(model, devices, plan) -> the model split and ready (``model.vramancer``)
    checkpoint.py  safetensors files read tensor by tensor into memory we own (pread, no full copy)
    layout.py      the plan's blocks (module prefixes) mapped onto its stages, checked against the model
    split.py       SplitRuntime (hooks, attach / detach, memory report) and RuntimeStage
    boundary.py    moving activations and shared layer inputs at stage boundaries only
    stream.py      streamed offload: the plan's stream buffer (two slots), prefetch on a side stream
    memory.py      stage_bytes: what each stage and stream buffer holds, counted once (memory report,
                   live view); the memory report next to the plan's figures
    telemetry_feed.py  those bytes as samples of the plan's simulated devices (run --monitor)

The runtime reads only the Plan (docs/architecture.md): module prefixes per block, each stage's mode
and compute device, the stream buffers; it never profiles the model itself.
    generate.py    generation with streamed text, prefill / decode speed, OOM naming the stage
    sampling.py    greedy / temperature + top-p with a per-request RNG (serve and run --cluster)
    kvcache.py     the KV cache stored as the plan's --kv-dtype (q8_0, fp8, bf16), dequantized on read
    quant/         weights quantized on load (nf4, int4, int8) and pre-quantized bitsandbytes checkpoints
    demo_model.py  the demo's small Llama and tokenizer, built offline
    commands/      `vramancer run`, `chat`, `demo`

Nothing here is imported by ``import vramancer``; torch and transformers load when used.
"""
import logging as _logging

# transformers imports torchao (vramancer[quant]) whenever it is installed; on a CPU-only torch the
# torchao wheel logs a failure for each of its CUDA-only extensions, and torch a deprecation for its
# enums: noise on every run, about kernels the runtime does not use (errors still show)
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
# bitsandbytes on AVX512-BF16 CPUs looks for a kernel of its repacked 4-bit layout, which the runtime
# keeps off (runtime/quant/backends.keep_cpu_layout): its warning is about a kernel never called
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
