"""A load test's results and their summary (pure): latency percentiles, throughput, and the reliability
counts that matter when clients misbehave: hung (no end within the request timeout), lost (the stream ended
without a finish_reason or an error), errors by kind.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    index: int
    left_early: bool = False  # the client disconnected on purpose (planned)
    status: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # an HTTP error status, an SSE error event or a transport error
    hung: bool = False  # no end within the request timeout
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    latency_s: float | None = None

    @property
    def completed(self) -> bool:
        return not self.left_early and not self.hung and self.error is None

    @property
    def lost(self) -> bool:
        """Ran to its end but the end said nothing: no finish_reason and no error."""
        return self.completed and self.finish_reason is None


def percentile(values: list[float], q: float) -> float:
    """Pure: the q-th percentile by linear interpolation (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    completed = [r for r in results if r.completed]
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [gap for r in results for gap in r.itl_s]
    latency = [r.latency_s for r in completed if r.latency_s is not None]
    output_tokens = sum(r.output_tokens for r in results)
    errors = Counter(r.error.split(":", 1)[0] for r in results if r.error is not None and not r.hung)
    return {
        "requests": len(results),
        "completed": len(completed),
        "left_early": sum(r.left_early for r in results),
        "hung": sum(r.hung for r in results),
        "lost": sum(r.lost for r in results),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "finish_reasons": dict(Counter(r.finish_reason for r in completed if r.finish_reason)),
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else math.nan,
        "requests_per_s": len(completed) / wall_s if wall_s > 0 else math.nan,
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in PERCENTILES},
        "itl_s": {f"p{q}": percentile(itl, q) for q in PERCENTILES},
        "latency_s": {f"p{q}": percentile(latency, q) for q in PERCENTILES},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the table `moefleet loadtest` prints."""

    def ms(value: float) -> str:
        return "-" if math.isnan(value) else f"{value * 1000:.1f}"

    lines = [
        f"requests {summary['requests']}  completed {summary['completed']}  left early {summary['left_early']}  "
        f"errors {summary['errors']}  hung {summary['hung']}  lost {summary['lost']}",
        f"wall {summary['wall_s']:.2f} s  throughput {summary['output_tokens_per_s']:.1f} output tok/s, "
        f"{summary['requests_per_s']:.2f} req/s  ({summary['output_tokens']} output tokens)",
        "",
        f"{'latency (ms)':<22}" + "".join(f"{'p' + str(q):>10}" for q in PERCENTILES),
    ]
    for key, label in (
        ("ttft_s", "time to first token"),
        ("itl_s", "inter-token"),
        ("latency_s", "end to end"),
    ):
        lines.append(f"{label:<22}" + "".join(f"{ms(summary[key][f'p{q}']):>10}" for q in PERCENTILES))
    if summary["errors_by_kind"]:
        lines.append("")
        lines.append(
            "errors: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(summary["errors_by_kind"].items()))
        )
    if summary["finish_reasons"]:
        lines.append(
            "finish reasons: " + ", ".join(f"{k} x{n}" for k, n in sorted(summary["finish_reasons"].items()))
        )
    return "\n".join(lines)
