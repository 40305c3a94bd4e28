"""serve: an OpenAI-compatible HTTP server for a (split) model, `vramancer serve`.

    engine.py    scheduler thread: continuous batching, KV admission from the plan, cancellation
    kv.py        the running batch's left-padded DynamicCache; KV bytes per stage
    pipeline.py  micro-batches ("lanes") overlapping across a split model's stages
    sampling.py  greedy / temperature + top-p with a per-request RNG (runtime/sampling.py's)
    text.py      incremental detokenization, stop strings
    schemas.py   request bodies (pydantic)
    app.py       FastAPI routes, SSE streaming, auth, limits
    metrics.py   Prometheus metrics (own registry)
    server.py    build_server, ServerThread (tests, notebooks), serve_forever (the CLI)
    commands.py  the `serve` subcommand
    cluster.py   `serve --cluster`: the same app over a cluster's stage workers, one request at a time
    testing.py   tiny random chat models built offline (tests, benchmarks)

Nothing is imported here: the CLI imports commands.py, which imports the web stack only when run.
"""
