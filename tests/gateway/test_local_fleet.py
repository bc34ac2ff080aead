"""`moefleet local`: the plan of a manifest's processes (pure), and one real fleet serving through its gateway."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from moefleet.engine.local_fleet import load_manifest, plan_fleet
from server.conftest import wait_for
from support.controlplane import free_port
from support.tiny_models import tiny_model_dir

MANIFESTS = sorted(Path(__file__).resolve().parents[2].joinpath("manifests").glob("*.yaml"))


def free_port_block(count: int = 16) -> int:
    """The first of `count` consecutive free ports below the kernel's ephemeral range (32768+ on Linux):
    `moefleet local` numbers its groups' HTTP and rendezvous ports from it, and a block inside the ephemeral
    range can lose a port to any connection or port-0 bind in between (seen: a rank's KV receiver)."""
    for base in random.sample(range(20000, 32000, count), 100):
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports in 20000-32000")


def _plan(path, tmp_path, **overrides):
    options = {
        "model": str(tmp_path),
        "device": "cpu",
        "dtype": None,
        "gateway_port": 8000,
        "first_port": 18000,
        "ranks_per_group": 2,
        "max_replicas": 1,
    }
    options.update(overrides)
    return plan_fleet(load_manifest(str(path)), **options)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_example_plans_one_group_per_role_and_a_gateway(path, tmp_path):
    body = load_manifest(str(path))
    plan = _plan(path, tmp_path)
    roles = list(body["spec"]["roles"])
    assert [g.role for g in plan.groups] == roles
    ports = [g.port for g in plan.groups]
    assert len(set(ports)) == len(ports) and 8000 not in ports
    for group in plan.groups:
        argv = list(group.argv)
        assert argv[0] == "serve" and argv[argv.index("--model") + 1] == str(tmp_path)
        assert int(argv[argv.index("--nproc-per-node") + 1]) <= 2
        assert group.env["MOEFLEET_ROLE"] == group.role
    assert plan.gateway.mode == ("disaggregated" if "decode" in roles else "mixed")
    assert {r: [g.url for g in e.groups] for r, e in plan.gateway.roles.items()} == {
        g.role: [g.url] for g in plan.groups
    }


def test_dtype_flag_overrides_the_manifest_and_gpus_are_split_per_group(tmp_path):
    reference = next(p for p in MANIFESTS if p.name == "deepseek-r1-reference.yaml")
    default = _plan(reference, tmp_path).groups[0].argv
    assert default[len(default) - 1 - default[::-1].index("--dtype") + 1] == "bfloat16"  # the manifest's
    explicit = _plan(reference, tmp_path, dtype="float32").groups[0].argv
    assert explicit[-2:] == ("--dtype", "float32")
    plan = _plan(reference, tmp_path, device="cuda", num_gpus=4, ranks_per_group=2)
    assert [g.env["CUDA_VISIBLE_DEVICES"] for g in plan.groups] == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="needs GPUs 2..3 but this machine has 3"):
        _plan(reference, tmp_path, device="cuda", num_gpus=3, ranks_per_group=2)


def test_missing_model_directory_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="pass --model DIR"):
        _plan(MANIFESTS[0], tmp_path, model=str(tmp_path / "nope"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\n")
    with pytest.raises(ValueError, match="exactly one MoEDeployment"):
        load_manifest(str(bad))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_fleet_serves_a_manifest_through_its_gateway(tmp_path):
    manifest = next(p for p in MANIFESTS if p.name == "qwen3-moe-small.yaml")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from moefleet.engine.cli import main; sys.exit(main())",
         "local", "-f", str(manifest), "--model", str(tiny_model_dir("qwen3_norm_topk")), "--port", str(port),
         "--first-engine-port", str(free_port_block()), "--ranks-per-group", "1", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        assert process.stdout is not None

        def serving() -> bool:
            line = process.stdout.readline()
            lines.append(line)
            return "through the gateway" in line or process.poll() is not None

        wait_for(serving, timeout=600, interval=0)
        assert process.poll() is None, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="Qwen/Qwen3-30B-A3B", prompt=[5, 6, 7], max_tokens=4)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0
    assert (tmp_path / "gateway.json").exists() and (tmp_path / "qwen3-moe-small-mixed-0.log").exists()


MAKE_RUN_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "local" / "tiny-pd.yaml"


def test_make_run_manifest_plans_two_rank_prefill_and_decode_groups(tmp_path):
    plan = _plan(MAKE_RUN_MANIFEST, tmp_path)
    assert [(g.role, g.env["MOEFLEET_ROLE"]) for g in plan.groups] == [
        ("prefill", "prefill"),
        ("decode", "decode"),
    ]
    assert all(g.argv[g.argv.index("--nproc-per-node") + 1] == "2" for g in plan.groups)
    assert plan.gateway.mode == "disaggregated"
    assert (
        "manifests/local/tiny-pd.yaml" in Path(__file__).resolve().parents[2].joinpath("Makefile").read_text()
    )


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_local_fleet_runs_the_make_run_pd_fleet_with_kv_transfer(tmp_path):
    """What `make run` starts: 1 prefill + 1 decode group of 2 ranks each + the gateway, on CPU; a request is
    computed by the prefill group, its KV moved to the decode group, and the answer equals transformers'."""
    import httpx
    from disaggregation.pd_fleet import hf_greedy

    name = "qwen3_norm_topk"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from moefleet.engine.cli import main; sys.exit(main())",
         "local", "-f", str(MAKE_RUN_MANIFEST), "--model", str(tiny_model_dir(name)), "--port", str(port),
         "--first-engine-port", str(free_port_block()), "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        assert process.stdout is not None

        def serving() -> bool:
            line = process.stdout.readline()
            lines.append(line)
            return "through the gateway" in line or process.poll() is not None

        wait_for(serving, timeout=500, interval=0)
        assert process.poll() is None, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        prompt = [5, 17, 230, 99, 4]
        reply = client.completions.create(
            model="tiny-qwen3-moe", prompt=prompt, max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        assert reply.choices[0].model_extra["token_ids"] == hf_greedy(name, [prompt], 6)[0]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "moefleet_gateway_kv_transfer_seconds_count 1.0" in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, "".join(lines)
    assert "2 ranks" in (tmp_path / "tiny-pd-decode-0.log").read_text()
