"""bfloat16 stays within the stated tolerance of float32 (tests/support/bf16_tolerance.py), on CPU."""

from __future__ import annotations

import pytest
from support.bf16_tolerance import check_bf16_as_faithful_as_transformers, check_bf16_tolerance
from support.tiny_models import TINY_CONFIGS, one_torch_thread


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_cpu_bfloat16_within_tolerance_of_float32(name):
    with one_torch_thread():
        check_bf16_tolerance(name, "cpu")


@pytest.mark.parametrize("name", ["glm4_flat", "gpt_oss_full_first", "llama4_all_moe"])
def test_cpu_bfloat16_as_faithful_as_transformers(name):
    """The least faithful config of each new family (glm4_flat: 89%) is as faithful as transformers' bf16."""
    pytest.importorskip("transformers")
    with one_torch_thread():
        check_bf16_as_faithful_as_transformers(name, "cpu")
