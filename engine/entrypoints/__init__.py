"""Entry points: the processes `moefleet serve` starts, wired from the server and distributed packages.

This is the only package that imports both `moefleet.engine.server` (HTTP app, engine clients) and
`moefleet.engine.distributed` (process groups, DP loop); neither of those imports the other.
  serve_command.py   `moefleet serve` flags, checks, engine construction, the HTTP serve loop
  group_serve.py     `moefleet serve` with several processes: spawn local ranks, front end on global rank 0
  dp_client.py       DPFrontEndClient (the HTTP server's EngineClient over a DP group), run_worker_rank
  worker_client.py   WorkerNodeClient: /health and /metrics on nodes other than the front end
"""
