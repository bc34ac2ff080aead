"""Role autoscaling's Prometheus reading: one instant query -> one number (httpx, raises on errors)."""

from __future__ import annotations

import math

import httpx


def query_signal(client: httpx.Client, url: str, query: str) -> float | None:
    """One instant query -> its single value (None when the result is empty or NaN); raises on errors."""
    response = client.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query})
    if not response.headers.get("content-type", "").startswith("application/json"):
        raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
    payload = response.json()
    if payload.get("status") != "success":
        raise ValueError(f"Prometheus answered {payload.get('status')!r}: {payload.get('error', '')}")
    result = (payload.get("data") or {}).get("result") or []
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value
