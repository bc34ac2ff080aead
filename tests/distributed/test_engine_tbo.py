"""Two-batch overlap over real gloo groups: greedy outputs with `tbo="on"` equal transformers token for token
at 2 ranks and at 4 ranks on 2 nodes x 2 processes, with concurrent requests (an odd number), prompts long
enough to be chunked by a small token budget (the split then cuts sequences), and a lone request (the other
ranks run two empty micro-batches each step so every collective lines up). One rank: tests/engine/test_tbo.py."""

from __future__ import annotations

import pytest
from support.reference import transformers_greedy
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 61, 8, 19, 27, 6, 13, 50, 4, 17, 21, 35],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
    [11, 400, 12],
    [90, 91, 92, 93, 94, 95, 96],
]
LONE = [44, 45, 46, 47, 48, 49, 50, 51, 52]
MAX_TOKENS = 5


@pytest.mark.parametrize(
    ("tiny", "nnodes", "nproc_per_node"),
    [("qwen3_norm_topk", 1, 2), ("deepseek_grouped", 2, 2)],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_tbo_on_matches_transformers(start_group, tiny, nnodes, nproc_per_node):
    world = nnodes * nproc_per_node
    model_dir = str(tiny_model_dir(tiny))
    options = {
        "model": model_dir,
        "prompts": PROMPTS,
        "lone_prompt": LONE,
        "max_tokens": MAX_TOKENS,
        "engine": {"tbo": "on", "max_num_batched_tokens": 6, "max_num_seqs": 4},
    }
    group = start_group("engine", nnodes, nproc_per_node, options=options)
    codes = group.wait(timeout_s=150 * world // 2)
    assert codes == [0] * world, [group.stderr(r)[-3000:] for r in range(world)]
    results = group.results()
    with one_torch_thread():
        expected = transformers_greedy(model_dir, [*PROMPTS, LONE], MAX_TOKENS)
    front = results[0]
    assert [front["tokens"][f"p{i}"] for i in range(len(PROMPTS))] == expected[:-1]
    assert front["lone"] == expected[-1]
    # Every rank ran every group step, each as two micro-batches (idle ranks included).
    steps = {r["num_steps_total"] for r in results}
    assert len(steps) == 1 and all(r["tbo_steps_total"] == r["num_steps_total"] > 0 for r in results)
