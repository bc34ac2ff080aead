"""Stand-ins for engines in the operator's cluster tests: kwok runs no containers, so a local HTTP server
answers for every group (its metrics, its admin routes), a real Prometheus scrapes it with the labels the
chart's PodMonitor relabelings would give, and the operator is restarted to read that Prometheus and to reach
the server through the documented test-only MOEFLEET_OPERATOR_ENGINE_URL_TEMPLATE override.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support.controlplane import free_port
from support.operator_cluster import OperatorProcess
from support.prometheus import PrometheusServer

Reply = tuple[int, bytes, str]  # (HTTP status, body, content type)


def gauges(**values: float) -> Reply:
    """A Prometheus text exposition of gauges `name value`."""
    text = "".join(f"# TYPE {name} gauge\n{name} {value}\n" for name, value in values.items())
    return 200, text.encode(), "text/plain; version=0.0.4"


class FakeEngineServer:
    """A threaded HTTP server on a free local port; subclasses answer `get`/`post` (None: 404)."""

    def __init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._reply(fake.get(self.path))

            def do_POST(self) -> None:
                self._reply(fake.post(self.path, dict(self.headers)))

            def _reply(self, reply: Reply | None) -> None:
                if reply is None:
                    self.send_error(404)
                    return
                code, body, kind = reply
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str) -> Reply | None:
        return None

    def post(self, path: str, headers: Mapping[str, str]) -> Reply | None:
        return None


def group_scrape_configs(port: int, namespace: str, groups: Mapping[str, str]) -> list[dict[str, Any]]:
    """One Prometheus job per group (group -> role) scraping `/metrics/<group>` of the fake at `port`, with
    the PodMonitor's labels; the deployment is the group name less `-<role>-<index>`."""
    return [
        {
            "job_name": group,
            "metrics_path": f"/metrics/{group}",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{port}"],
                    "labels": {
                        "namespace": namespace,
                        "deployment": group.rsplit("-", 2)[0],
                        "role": role,
                        "group": group,
                    },
                }
            ],
        }
        for group, role in groups.items()
    ]


@contextmanager
def operator_reading(
    operator: OperatorProcess,
    fake: FakeEngineServer,
    namespace: str,
    groups: Mapping[str, str],
    env: Mapping[str, str],
) -> Iterator[tuple[PrometheusServer, dict[str, str]]]:
    """A Prometheus scraping `fake`'s groups every second (all scraped once before it returns) and the
    operator restarted to read it (and to reach the fake as the engines) with `env` on top; yields
    (prometheus, the operator's extra env). Afterwards the Prometheus and the fake stop and the operator
    restarts with its defaults."""
    prom = PrometheusServer(
        scrape_configs=group_scrape_configs(fake.port, namespace, groups), scrape_interval="1s"
    )
    prom.start()
    settings = {
        "MOEFLEET_OPERATOR_PROMETHEUS_URL": prom.url,
        "MOEFLEET_OPERATOR_PROMETHEUS_TIMEOUT_SECONDS": "2",
        "MOEFLEET_OPERATOR_ENGINE_URL_TEMPLATE": f"http://127.0.0.1:{fake.port}/{{group}}",
        **env,
    }
    try:
        # Every group scraped once before the operator reads: a role summed over part of its groups looks
        # idle (the operator copes, see autoscale.decide, but a test should not depend on that timing).
        jobs = "|".join(groups)
        prom.wait_for(f'count(up{{job=~"{jobs}"}} == 1) == {len(groups)}', timeout_s=60)
        operator.restart(settings)
        yield prom, settings
    finally:
        prom.stop()
        fake.server.shutdown()
        operator.restart()
