"""`moefleet serve`: one process, or this node's part of a multi-process group (group_serve.py).

The flags, checks and the HTTP serve loop are in serve_command.py; this module only decides which path runs.
"""

from __future__ import annotations

import argparse
import sys

from moefleet.engine.entrypoints.serve_command import (
    _check_device,
    add_parser,
    bind_socket,
    build_engine_client,
    check_args,
    print_weight_plan,
    serve_http,
)

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    launch = check_args(args)
    if launch.world_size > 1:
        from moefleet.engine.entrypoints.group_serve import run_group

        return run_group(args, launch)
    sock = bind_socket(args.host, args.port)
    try:
        _check_device(args.device)
        print_weight_plan(args, launch.world_size)
        serve_http(build_engine_client(args), sock, args)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":  # python -m moefleet.engine.entrypoints.serve ...
    from moefleet.engine.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
