"""Distributed building blocks: process groups, DP step agreement, EP dispatch backends, failure handling.

Parallelism stays outside model code (torchtitan / gpt-fast style); see docs/distributed.md.
  groups.py          launch contract -> process groups (device + CPU gloo), start-up validation
  a2a.py             TokenDispatcher over all_to_all_single (portable: gloo on CPU, NCCL on GPU)
  deepep.py          TokenDispatcher over DeepEP (normal / low-latency), optional and untested here
  backends.py        make_dispatcher("local" | "a2a" | "deepep" | "auto", ...)
  ep.py              set the EP layout before building a model; install dispatchers on its MoE layers
  dp.py              per-step DP agreement (idle steps, prefill/TBO/graph votes), least-load rank picking
  request_router.py  front end (rank 0) -> DP ranks request hand-over, outputs back
  watchdog.py        heartbeat + abort key: survivors exit promptly when a rank dies
  engine_glue.py     build_engine (layout, load, dispatchers, step agreement), DPEngineLoop
"""
