"""kube.Kube.crd_exists: worker threads that miss the cache together make ONE lookup (single flight).

A real HTTP server stands in for the API server's CRD endpoint (slow to answer, so the threads really
overlap) and counts the GETs it receives; the client is the operator's own, configured from a kubeconfig.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support.kube_client import kube_for

INSTALLED = "podmonitors.monitoring.coreos.com"


@pytest.fixture
def api_server():
    hits: list[str] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with lock:
                hits.append(self.path)
            time.sleep(0.3)  # a busy API server: every worker asks before the first answer comes
            name = self.path.rsplit("/", 1)[-1]
            found = name == INSTALLED
            body = json.dumps({"kind": "CustomResourceDefinition"} if found else {"kind": "Status"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_eight_workers_missing_the_cache_together_make_one_lookup_per_crd(tmp_path, api_server):
    url, hits = api_server
    kube = kube_for(tmp_path, url)
    names = [INSTALLED, "podgroups.scheduling.volcano.sh"]
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: kube.crd_exists(names[i % 2], 60.0), range(16)))
    finally:
        kube.close()
    assert answers == [True, False] * 8  # every worker gets the answer, installed or not
    assert sorted(h.rsplit("/", 1)[-1] for h in hits) == sorted(names)  # one GET per CRD, not per worker
    assert kube.requests[("GET", "customresourcedefinitions")] == 2


def test_an_expired_answer_is_looked_up_again(tmp_path, api_server):
    url, hits = api_server
    kube = kube_for(tmp_path, url)
    try:
        assert kube.crd_exists(INSTALLED, 0.2) and kube.crd_exists(INSTALLED, 0.2)
        assert len(hits) == 1
        time.sleep(0.3)
        assert kube.crd_exists(INSTALLED, 0.2)
        assert len(hits) == 2
    finally:
        kube.close()
