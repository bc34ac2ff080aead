"""`moefleet loadtest`: send a bounded, seeded load to an OpenAI-compatible server and print what happened.

Example (200 streams, 64 at a time, a third of the clients hanging up mid-stream):
    moefleet loadtest --url http://127.0.0.1:8000 --requests 200 --concurrency 64 \\
        --prompt-len uniform:8-64 --output-len uniform:16-128 --disconnect-fraction 0.33

Prints time to first token, inter-token latency and end-to-end latency percentiles, throughput, and the
counts a reliability check needs: errors by kind, hung requests (no end within --request-timeout) and lost
ones (a stream that ended without a finish_reason or an error). Exit code 1 when any request hung or was
lost, so a CI job can gate on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from moefleet.engine.cli import CommandError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "loadtest",
        help="bounded load (with vanishing clients) against an OpenAI-compatible endpoint",
        description="Send a seeded load to /v1/completions or /v1/chat/completions and print latency "
        "percentiles, throughput and error / hung / lost counts.",
    )
    p.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--requests", type=int, default=100, help="requests in total (default 100)")
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second, Poisson arrivals (default 0: all at once)",
    )
    p.add_argument("--prompt-len", default="uniform:8-64", help="prompt words: N, uniform:A-B or normal:M,S")
    p.add_argument("--output-len", default="uniform:16-64", help="max_tokens: N, uniform:A-B or normal:M,S")
    p.add_argument("--no-stream", action="store_true", help="plain JSON replies instead of SSE streams")
    p.add_argument(
        "--disconnect-fraction",
        type=float,
        default=0.0,
        help="share of clients that hang up mid-stream (default 0)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/moefleet extension)")
    p.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds before a request counts as hung"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the plan (lengths, arrivals, who leaves)")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from moefleet.engine.loadtest.client import Target, first_model, run_load
    from moefleet.engine.loadtest.plan import parse_distribution, plan_requests
    from moefleet.engine.loadtest.report import format_summary, summarize

    try:
        prompt_len, output_len = parse_distribution(args.prompt_len), parse_distribution(args.output_len)
        plan = plan_requests(
            args.requests, prompt_len, output_len, args.rate, args.disconnect_fraction, args.seed
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.concurrency < 1:
        raise CommandError(f"--concurrency {args.concurrency} must be at least 1")
    if args.disconnect_fraction and args.no_stream:
        raise CommandError("--disconnect-fraction needs streams", "drop --no-stream")
    model = args.model
    if model is None:
        try:
            model = first_model(args.url, args.api_key)
        except Exception as exc:
            raise CommandError(
                f"cannot list the models at {args.url}: {exc}", "check --url, or pass --model"
            ) from None
    target = Target(
        args.url,
        model,
        args.endpoint,
        not args.no_stream,
        args.ignore_eos,
        args.api_key,
        args.request_timeout,
    )
    results, wall = asyncio.run(run_load(target, plan, args.concurrency))
    summary = summarize(results, wall)
    print(
        f"moefleet loadtest: {args.requests} requests to {target.url} ({model}), concurrency {args.concurrency}, "
        f"rate {args.rate or 'unbounded'}, prompt {prompt_len} words, output {output_len} tokens, "
        f"{args.disconnect_fraction:.0%} leave early"
    )
    print(format_summary(summary), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2, default=str)
    return 1 if summary["hung"] or summary["lost"] else 0
