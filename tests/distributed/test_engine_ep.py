"""The real engine on tiny Qwen3-MoE and DeepSeek-V3 (MLA, grouped top-k, shared experts) checkpoints split over 2 ranks (DP attention, EP MoE over gloo
all_to_all): requests enter at rank 0 through the server-facing DPFrontEndClient, are placed on both ranks,
and the greedy tokens equal a single-process run of the same model; a bad request is refused, not fatal."""

from __future__ import annotations

import signal
import time

import pytest
from moefleet.engine.distributed.ep import count_routed_expert_parameters
from moefleet.engine.distributed.watchdog import EXIT_CODE
from moefleet.engine.llm_engine import LLM
from moefleet.engine.sampling_params import SamplingParams
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]

PROMPTS = [
    [5, 17, 42, 99, 3, 250],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
    [11, 400, 12],
]
MAX_TOKENS = 6


@pytest.mark.parametrize("tiny", ["qwen3_norm_topk", "deepseek_grouped"])
def test_two_rank_engine_matches_single_process(start_group, tiny):
    model_dir = str(tiny_model_dir(tiny))
    group = start_group(
        "engine", 1, 2, options={"model": model_dir, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    )
    codes = group.wait(timeout_s=120)
    assert codes == [0, 0], [group.stderr(r)[-3000:] for r in range(2)]
    front, other = group.results()
    with one_torch_thread():
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        single = LLM(model_dir, max_model_len=128)
        reference = single.generate(PROMPTS, greedy)
    full_expert_params = count_routed_expert_parameters(single.engine.model_runner.model)
    expected = {f"p{i}": r.token_ids for i, r in enumerate(reference)}
    assert {k: v for k, v in front["tokens"].items() if k != "bad"} == expected
    assert (
        front["tokens"]["bad"].startswith("RequestRejectedError: ") and "vocabulary" in front["tokens"]["bad"]
    )
    assert front["prompt_tokens_total"] > 0 and other["prompt_tokens_total"] > 0  # both DP ranks served
    assert front["expert_params"] == other["expert_params"] == full_expert_params // 2 > 0


def test_peer_death_fails_client_requests_and_exits(start_group):
    """Killing a DP rank mid-stream: rank 0's in-flight requests get an error and rank 0 exits (code 17)."""
    model_dir = str(tiny_model_dir("qwen3_norm_topk"))
    group = start_group("engine-peer-dies", 1, 2, options={"model": model_dir})
    for rank, proc in enumerate(group.procs):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", (rank, line, group.wait(1), group.stderr(rank)[-2000:])
    group.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = group.wait(timeout_s=30)
    assert codes[0] == EXIT_CODE, group.stderr(0)[-3000:]
    assert time.monotonic() - killed_at < 20
    stdout, stderr = group.outputs[0]
    assert "CLIENT GOT EngineDeadError: the DP group stopped" in stdout, stdout
    assert "moefleet: rank 0 failed: DP engine loop stopped" in stderr, stderr[-3000:]
