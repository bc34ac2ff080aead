"""moefleet.engine: the serving engine (models, KV cache, scheduler, distributed MoE, HTTP server)."""
