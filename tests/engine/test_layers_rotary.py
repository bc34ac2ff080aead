"""Rotary embedding: frequencies for every supported rope type equal transformers' own computation."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.rotary import (
    RotaryEmbedding,
    compute_inv_freq,
    mla_softmax_scale,
    parse_rope_scaling,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CASES = {
    "yarn_deepseek": {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "yarn_kimi": {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "yarn_mscale_differs": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
    "yarn_plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(case):
    rope = dict(CASES[case])
    max_pos = 163840 if case.startswith("yarn_") and rope["factor"] > 10 else 131072
    hf_config = transformers.DeepseekV3Config(
        rope_scaling=dict(rope, rope_theta=50000.0), max_position_embeddings=max_pos, qk_rope_head_dim=64
    )
    rope_type = hf_config.rope_parameters["rope_type"]
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    theta, scaling = parse_rope_scaling({"rope_theta": 50000.0, "rope_scaling": rope}, max_pos)
    inv_freq, factor = compute_inv_freq(64, theta, scaling)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float())
    assert factor == pytest.approx(hf_factor)


def test_mla_softmax_scale_uses_mscale_all_dim():
    _, scaling = parse_rope_scaling({"rope_scaling": CASES["yarn_deepseek"]}, 163840)
    # DeepSeek-V3: 0.1 * ln(40) + 1 = 1.3689, squared on top of 192^-0.5.
    assert mla_softmax_scale(192, scaling) == pytest.approx(192**-0.5 * 1.36888794541139**2)
    _, none = parse_rope_scaling({}, 4096)
    assert mla_softmax_scale(192, none) == pytest.approx(192**-0.5)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'dynamic'.*supported: default"):
        parse_rope_scaling({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 4096)


def test_interleaved_and_neox_layouts_match_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 3, 17, 500])
    q, k = torch.randn(4, 2, 8, generator=g), torch.randn(4, 1, 8, generator=g)
    for interleaved, hf_fn in ((True, apply_rotary_pos_emb_interleave), (False, apply_rotary_pos_emb)):
        rotary = RotaryEmbedding(8, 10000.0, interleaved=interleaved)
        cos, sin = rotary.cos_sin(positions, torch.float32)
        hf_cos, hf_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        # HF works on [batch, heads, seq, dim]
        hq, hk = hf_fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
        oq, ok = rotary(positions, q, k)
        torch.testing.assert_close(oq, hq[0].transpose(0, 1))
        torch.testing.assert_close(ok, hk[0].transpose(0, 1))
