"""The operator's own API client (operator/kube.py Kube) pointed at a plain HTTP server that stands in for
the API server, through a kubeconfig written to `tmp_path`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moefleet.operator.kube import Kube


def kube_for(tmp_path: Path, url: str, **kwargs: Any) -> Kube:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return Kube(str(path), **kwargs)
