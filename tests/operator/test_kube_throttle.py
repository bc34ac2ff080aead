"""kube.Kube.request waits out HTTP 429 (API Priority and Fairness, storage re-initializing) and resends, within
a time budget; other errors are not retried. A real HTTP server answers 429 a set number of times."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from moefleet.operator.kube import KubeError, throttle_delay
from support.kube_client import kube_for


@pytest.fixture
def api_server():
    state = {"throttle": 0, "status": 429, "hits": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            with lock:
                state["hits"] += 1
                refuse = state["throttle"] > 0
                state["throttle"] -= 1
            if refuse:
                code, body = state["status"], {"kind": "Status", "message": "too many requests"}
            else:
                code, body = 200, {"kind": "ConfigMap", "metadata": {"name": "x"}}
            data = json.dumps(body).encode()
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = _answer  # noqa: N815 (http.server's names)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_throttled_request_is_resent_until_it_passes(api_server, tmp_path):
    url, state = api_server
    state["throttle"] = 3
    kube = kube_for(tmp_path, url, throttle_budget_s=5.0)
    got = kube.request("PATCH", "/api/v1/namespaces/n/configmaps/x", "configmaps", body={"data": {}})
    assert got["metadata"]["name"] == "x"
    assert state["hits"] == 4
    assert kube.requests[("PATCH", "configmaps")] == 4  # every send counts against the request budget


def test_throttling_past_the_budget_fails_with_the_servers_message(api_server, tmp_path):
    url, state = api_server
    state["throttle"] = 10**6
    kube = kube_for(tmp_path, url, throttle_budget_s=0.0)
    with pytest.raises(KubeError) as error:
        kube.request("GET", "/api/v1/namespaces/n/configmaps/x", "configmaps")
    assert error.value.status == 429 and "too many requests" in str(error.value)
    assert state["hits"] == 1


def test_other_errors_are_not_resent(api_server, tmp_path):
    url, state = api_server
    state.update(throttle=1, status=409)
    kube = kube_for(tmp_path, url, throttle_budget_s=5.0)
    with pytest.raises(KubeError):
        kube.request("GET", "/api/v1/namespaces/n/configmaps/x", "configmaps")
    assert state["hits"] == 1


@pytest.mark.parametrize(
    "retry_after,attempt,expected",
    [("2", 0, 2.0), ("0", 3, 0.0), ("120", 0, 10.0), ("-1", 0, 0.0), (None, 0, 0.5), (None, 2, 2.0),
     (None, 9, 5.0), ("Wed, 21 Oct 2026 07:28:00 GMT", 1, 1.0)],
)  # fmt: skip
def test_throttle_delay(retry_after, attempt, expected):
    assert throttle_delay(retry_after, attempt) == expected


def test_an_endless_zero_retry_after_stops_after_ten_resends(api_server, tmp_path):
    url, state = api_server
    state["throttle"] = 10**6
    kube = kube_for(tmp_path, url, throttle_budget_s=30.0)
    with pytest.raises(KubeError):
        kube.request("GET", "/api/v1/namespaces/n/configmaps/x", "configmaps")
    assert state["hits"] == 11
