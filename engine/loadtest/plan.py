"""What a load test sends, decided up front from a seed (pure): so two runs with one seed send the same load.

Lengths come from distributions written as text on the command line:
    "64"             always 64
    "uniform:16-256" uniform integers in [16, 256]
    "normal:128,32"  normal(mean 128, std 32), rounded, at least 1
Arrivals: `rate` requests per second as a Poisson process (exponential gaps), or all at once when rate is 0
(then only `concurrency` bounds how many are in flight).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("fixed", "uniform", "normal")


@dataclass(frozen=True, slots=True)
class Distribution:
    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}-{int(self.b)}"
        return f"normal:{self.a:g},{self.b:g}"


def parse_distribution(text: str) -> Distribution:
    """ "64", "uniform:16-256" or "normal:128,32" (a ValueError says which form was expected)."""
    forms = "use N, uniform:LOW-HIGH or normal:MEAN,STD (e.g. 64, uniform:16-256, normal:128,32)"
    kind, _, rest = text.partition(":")
    try:
        if not rest:
            value = int(kind)
            if value < 1:
                raise ValueError
            return Distribution("fixed", value)
        if kind == "uniform":
            low, high = (int(part) for part in rest.split("-"))
            if not 1 <= low <= high:
                raise ValueError
            return Distribution("uniform", low, high)
        if kind == "normal":
            mean, std = (float(part) for part in rest.split(","))
            if mean < 1 or std < 0:
                raise ValueError
            return Distribution("normal", mean, std)
    except ValueError:
        pass
    raise ValueError(f"bad length distribution {text!r}: {forms}")


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    index: int
    send_at_s: float  # offset from the start of the run
    prompt_len: int  # tokens (token-id prompts) or words (chat)
    max_tokens: int
    leave_after_chunks: int | None  # this client disconnects after that many content chunks (None: stays)


def plan_requests(
    num_requests: int,
    prompt_len: Distribution,
    output_len: Distribution,
    rate: float,
    disconnect_fraction: float,
    seed: int,
) -> list[PlannedRequest]:
    """Pure: every request of a run. Exactly round(fraction * n) clients leave early, each after a number of
    chunks drawn from [1, max(1, max_tokens // 2)], so they leave mid-stream, not before or after it."""
    if num_requests < 0:
        raise ValueError(f"the number of requests must be >= 0, got {num_requests}")
    if not 0.0 <= disconnect_fraction <= 1.0:
        raise ValueError(f"the disconnect fraction must be in [0, 1], got {disconnect_fraction}")
    if rate < 0:
        raise ValueError(f"the request rate must be >= 0 (0 = all at once), got {rate}")
    rng = random.Random(seed)
    leaving = set(rng.sample(range(num_requests), round(disconnect_fraction * num_requests)))
    planned = []
    clock = 0.0
    for index in range(num_requests):
        if rate > 0 and index > 0:
            clock += rng.expovariate(rate)
        max_tokens = output_len.sample(rng)
        leave = rng.randint(1, max(1, max_tokens // 2)) if index in leaving else None
        planned.append(PlannedRequest(index, clock, prompt_len.sample(rng), max_tokens, leave))
    return planned
