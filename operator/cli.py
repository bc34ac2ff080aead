"""`moefleet operator`: run the MoEDeployment operator (the same as `kopf run -m moefleet.operator`).

Exposes `add_parser(subparsers)` and `run(args)` for moefleet.engine.cli's command registry.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for MoEDeployment resources",
        description="Reconcile MoEDeployments into groups of StatefulSets, Services and a gateway. "
        "Settings come from MOEFLEET_OPERATOR_* environment variables (docs/operator.md).",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="kopf liveness endpoint URL (default http://0.0.0.0:8080/healthz; '' disables it)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    import kopf
    import moefleet.operator  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0
