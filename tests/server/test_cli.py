"""`moefleet` CLI: argument checks fail fast with exit code 2 and a one-line error plus a hint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from moefleet.engine import tiny_model, tiny_model_command
from moefleet.engine.cli import build_parser, main
from moefleet.engine.server.launch import ParallelLaunch
from moefleet.engine.server.serve_command import examples

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
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank (2) must be in [0, nnodes (2))"),
        (["--nnodes", "0"], "--nnodes (0) must be >= 1"),
        (["--nproc-per-node", "0"], "--nproc-per-node (0) must be >= 1"),
        (["--master-port", "70000"], "--master-port (70000) must be in 1..65535"),
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
    assert "--node-rank (5) must be in [0, nnodes (3))" in _error_lines(capsys)[0]


def test_launch_ranks():
    launch = ParallelLaunch(nnodes=2, node_rank=1, nproc_per_node=4)
    assert launch.world_size == 8
    assert [launch.global_rank(i) for i in range(4)] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="local_rank"):
        launch.global_rank(4)


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


def test_unsupported_operator_settings_are_reported_not_dropped():
    from moefleet.engine.server.serve_command import unsupported_settings

    assert unsupported_settings({}) == []
    assert unsupported_settings({"MOEFLEET_EPLB_REDUNDANT_EXPERTS": "0"}) == []
    (warning,) = unsupported_settings({"MOEFLEET_EPLB_REDUNDANT_EXPERTS": "32"})
    assert warning.startswith(
        "MOEFLEET_EPLB_REDUNDANT_EXPERTS=32: redundant experts (EPLB) are not implemented"
    )
