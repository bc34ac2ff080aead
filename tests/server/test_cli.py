"""`moefleet` CLI: argument checks fail fast with exit code 2 and a one-line error plus a hint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from moefleet.engine import tiny_model, tiny_model_command
from moefleet.engine.cli import build_parser, main
from moefleet.engine.entrypoints.serve_command import examples

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake_model_dir(tmp_path):
    # Enough for the checks that run before any weight is loaded.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    return tmp_path


def _error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_missing_model_dir(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    error, hint = _error_lines(capsys)
    assert error.startswith("moefleet serve: error: --model") and "no such directory" in error
    assert hint.startswith("hint:") and "make-tiny-model" in hint


def test_model_dir_without_config(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "config.json" in _error_lines(capsys)[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2", "--node-rank", "2"], "node_rank (2) must be in [0, nnodes (2)) (set --node-rank"),
        (["--nnodes", "0"], "nnodes (0) must be >= 1 (set --nnodes / MOEFLEET_NNODES)"),
        (["--nproc-per-node", "0"], "nproc_per_node (0) must be >= 1 (set --nproc-per-node"),
        (["--master-port", "70000"], "master_port (70000) must be in 1..65535 (set --master-port"),
        (["--max-num-seqs", "0"], "--max-num-seqs 0 must be a positive integer"),
    ],
)
def test_bad_flags(fake_model_dir, capsys, flags, message):
    assert main(["serve", "--model", str(fake_model_dir), *flags]) == 2
    assert message in _error_lines(capsys)[0]


def test_launch_flags_default_from_environment(fake_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("MOEFLEET_NNODES", "3")
    monkeypatch.setenv("MOEFLEET_NODE_RANK", "5")
    assert main(["serve", "--model", str(fake_model_dir)]) == 2
    assert "node_rank (5) must be in [0, nnodes (3))" in _error_lines(capsys)[0]


def test_flags_win_over_environment(fake_model_dir, monkeypatch):
    from moefleet.engine.entrypoints.serve_command import launch_topology

    monkeypatch.setenv("MOEFLEET_NNODES", "3")
    monkeypatch.setenv("MOEFLEET_NODE_RANK", "2")
    monkeypatch.setenv("MOEFLEET_LOCAL_RANK", "1")  # serve is always local rank 0: it spawns the others
    args = build_parser().parse_args(
        ["serve", "--model", str(fake_model_dir), "--nnodes", "4", "--nproc-per-node", "2"]
    )
    launch = launch_topology(args)
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node, launch.local_rank) == (4, 2, 2, 0)
    assert launch.rank == 4 and launch.world_size == 8


def test_port_in_use(fake_model_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(fake_model_dir), "--port", str(port)]) == 2
    error, hint = _error_lines(capsys)
    assert f"port {port} on 127.0.0.1 is already in use" in error and "--port" in hint


def test_cuda_without_gpu(fake_model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["serve", "--model", str(fake_model_dir), "--port", "0", "--device", "cuda"]) == 2
    error, hint = _error_lines(capsys)
    assert "--device cuda was requested but no CUDA GPU is available" in error and "--device cpu" in hint


def test_subcommands_registered_and_arches_match():
    parser = build_parser()
    assert parser.parse_args(["operator"]).command == "operator"
    args = parser.parse_args(["make-tiny-model", "--arch", "deepseek_v3", "--out", "x"])
    assert (args.arch, args.out, args.seed) == ("deepseek_v3", "x", 0)
    assert tiny_model_command.ARCHES == tiny_model.ARCHES
    with pytest.raises(SystemExit):
        parser.parse_args(["make-tiny-model", "--arch", "llama", "--out", "x"])


def test_examples_mention_a_working_address():
    text = examples("0.0.0.0", 8123, "tiny")
    assert "http://127.0.0.1:8123/v1/completions" in text
    assert 'base_url="http://127.0.0.1:8123/v1"' in text and '"model": "tiny"' in text


def test_unsupported_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})
    )
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    error = _error_lines(capsys)[0]
    assert error.startswith(f"moefleet serve: error: cannot load the model in {tmp_path}")


@pytest.mark.parametrize("manifest", sorted(Path(__file__).parents[2].glob("manifests/*.yaml")))
def test_operator_rendered_engine_args_parse(manifest):
    """The operator starts pods with `moefleet serve <engine_args>`: every example must parse here."""
    yaml = pytest.importorskip("yaml")
    from moefleet.operator import render, spec

    for body in yaml.safe_load_all(manifest.read_text()):
        if not body or body.get("kind") != "MoEDeployment":
            continue
        body.setdefault("metadata", {}).setdefault("namespace", "default")
        deployment = spec.parse(body, default_image="moefleet:test")
        for role in deployment.roles:
            args = render.engine_args(deployment, role, 0)
            args = [a.replace("$(MOEFLEET_NODE_RANK)", "0") for a in args]
            parsed = build_parser().parse_args(["serve", *args])
            assert parsed.model == deployment.model.path and parsed.nnodes == role.nodes_per_replica


def test_redundant_experts_are_honoured_not_warned_about():
    from moefleet.engine.entrypoints.serve_command import unsupported_settings

    assert unsupported_settings({}) == []
    assert unsupported_settings({"MOEFLEET_EPLB_REDUNDANT_EXPERTS": "32"}) == []


DEEPSEEK_R1_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 256, "n_group": 8,
                      "max_position_embeddings": 163840}  # fmt: skip


@pytest.mark.parametrize(
    "manifest", ["deepseek-r1-reference.yaml", "kimi-k2-h200.yaml", "qwen3-moe-small.yaml"]
)
def test_manifest_roles_pass_the_serve_preflight(manifest, tmp_path, monkeypatch):
    """Every role of the example deployments passes `moefleet serve`'s start-up checks with exactly the args
    and environment the operator renders (DeepSeek-R1's EP72 decode: 256 + 32 redundant = 4 slots per GPU)."""
    yaml = pytest.importorskip("yaml")
    from moefleet.engine.entrypoints.serve_command import check_args, eplb_config
    from moefleet.operator import render, spec

    path = Path(__file__).parents[2] / "manifests" / manifest
    checked = 0
    for body in yaml.safe_load_all(path.read_text()):
        if not body or body.get("kind") != "MoEDeployment":
            continue
        body.setdefault("metadata", {}).setdefault("namespace", "default")
        deployment = spec.parse(body, default_image="moefleet:test")
        config = dict(DEEPSEEK_R1_CONFIG, n_routed_experts=deployment.model.num_experts or 256)
        (tmp_path / "config.json").write_text(json.dumps(config))
        for role in deployment.roles:
            container = render.render_statefulset(deployment, role.name, 0)["spec"]["template"]["spec"][
                "containers"
            ][0]
            for item in container["env"]:
                if "value" in item:
                    monkeypatch.setenv(item["name"], item["value"])
            args = [a.replace("$(MOEFLEET_NODE_RANK)", "0") for a in container["args"]]
            args[args.index("--model") + 1] = str(tmp_path)
            parsed = build_parser().parse_args(["serve", *args])
            launch = check_args(parsed)  # raises CommandError (exit 2) on uneven expert slots
            slots = (
                config["n_routed_experts"] + eplb_config(parsed).num_redundant_experts
            ) / launch.world_size
            assert slots == int(slots) >= 1
            if manifest.startswith("deepseek") and role.name == "decode":
                assert (
                    launch.world_size == 72 and eplb_config(parsed).num_redundant_experts == 32 and slots == 4
                )
            checked += 1
    assert checked


def test_uneven_expert_slots_fail_preflight_with_a_fix(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_R1_CONFIG))
    argv = ["serve", "--model", str(tmp_path), "--nnodes", "9", "--nproc-per-node", "8", "--port", "0"]
    assert main(argv) == 2
    error = _error_lines(capsys)[0]
    assert "num_experts (256) is not divisible by expert-parallel size (72)" in error
    assert "use --num-redundant-experts 32" in error
    assert main([*argv, "--num-redundant-experts", "8"]) == 2
    assert "256) + redundant experts (8) = 264 physical expert slots" in _error_lines(capsys)[0]


def test_admin_token_file_must_exist(fake_model_dir, capsys):
    assert (
        main(["serve", "--model", str(fake_model_dir), "--admin-token-file", str(fake_model_dir / "nope")])
        == 2
    )
    assert "--admin-token-file" in _error_lines(capsys)[0]
