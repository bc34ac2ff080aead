"""Prefill/decode disaggregation over the `p2p` KV transfer, end to end: `moefleet serve --nproc-per-node 2
--role prefill|decode --kv-transfer p2p` (real processes; each rank's pair groups over gloo on CPU, float32,
tiny models) behind the gateway; the fixtures of pd_fleet.py, as test_pd_groups.py uses them over tcp.

Oracle: transformers greedy generation, single and concurrent, streamed and not; KV usage back to 0 on both
groups; the decode group's bootstrap and both start-up lines name the backend.
"""

from __future__ import annotations

import httpx
import pytest
from disaggregation.pd_fleet import PROMPTS, check_greedy_through, hf_greedy, kv_idle, pd_config, pd_groups
from faults.conftest import wait_until
from gateway.conftest import serve_gateway

pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_p2p_transfer_between_two_rank_groups_matches_transformers(name, tmp_path):
    expected = hf_greedy(name, PROMPTS)
    with (
        pd_groups(name, tmp_path, extra=["--kv-transfer", "p2p"]) as groups,
        serve_gateway(pd_config(groups.prefill.base_url, groups.decode.base_url)) as (url, _),
    ):
        for group in (groups.prefill, groups.decode):
            assert "KV transfer backend p2p" in group.log()
            boot = httpx.get(group.base_url + "/v1/pd/bootstrap", timeout=10).json()
            assert boot["kv_transfer_backend"] == "p2p"
        # Concurrent requests go over both decode ranks: several pair groups, each carrying several transfers.
        check_greedy_through(url, name, expected, concurrent=6)
        wait_until(lambda: kv_idle(groups.prefill.base_url, groups.decode.base_url), timeout=15)
        assert "KV transfer failed" not in groups.prefill.log() + groups.decode.log()
