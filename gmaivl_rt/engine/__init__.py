"""The serving engine, in nano-vllm's shape: `engine.Engine` (the API, the request-prep pool and the loop),
`sequence` (Request, Sequence), `scheduler` (queues, KV blocks, admission, preemption, retirement; its block
accounting in `block_pool`), one model runner per backend (`torch_runner` over the paged KV cache of
`paged_cache`, `graph_runner` over exported graphs). See docs/architecture.md for one request's path through it."""
