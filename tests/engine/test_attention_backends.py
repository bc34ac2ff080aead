"""Attention backends: backend choice, the Triton KV write, and the Triton backend (Triton kernels run
under TRITON_INTERPRET=1 on CPU) against dense attention and against the torch reference backend, for
mixed prefill / chunked prefill / decode steps of GQA and MLA (decode rows on MLA's latent path).
Tolerance: float32, atol = rtol = 1e-4 (kernels accumulate in fp32 with exact dots; differences are
rounding only)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moefleet.engine.attention import resolve_attention_backend  # noqa: E402
from moefleet.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from moefleet.engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from moefleet.engine.layers.attention import PagedAttention  # noqa: E402
from moefleet.engine.layers.mla import MLAConfig, MLAttention  # noqa: E402
from moefleet.engine.layers.rotary import RotaryEmbedding  # noqa: E402

from .test_layers_attention import dense_causal  # noqa: E402

BLOCK = 16
TOL = {"atol": 1e-4, "rtol": 1e-4}
# Sequences of 37, 21 and 18 tokens: step 1 prefills seq0[:20] and seq1[:17]; step 2 mixes a chunk over
# cached pages (seq0), a decode (seq1) and a fresh prompt (seq2); step 3 is decode only.
LENGTHS = {0: 31, 1: 19, 2: 18}
STEPS = [
    [(0, 0, 20), (1, 0, 17)],
    [(0, 20, 10), (1, 17, 1), (2, 0, 17)],
    [(0, 30, 1), (2, 17, 1), (1, 18, 1)],
]


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_backend("auto", cpu)[0] == "torch"
    assert resolve_attention_backend("triton", cpu) == ("triton", "requested")
    assert resolve_attention_backend("torch", cuda) == ("torch", "requested")
    assert resolve_attention_backend("auto", cuda, block_size=8)[0] == "torch"  # kernels need >= 16
    with pytest.raises(ValueError, match="attention backend"):
        resolve_attention_backend("flash", cpu)


def test_forward_mode_and_batch_tensors():
    assert ForwardMode.of([]) is ForwardMode.IDLE
    assert ForwardMode.of([1, 1]) is ForwardMode.DECODE
    assert ForwardMode.of([3, 2]) is ForwardMode.EXTEND
    assert ForwardMode.of([1, 3]) is ForwardMode.MIXED
    batch = ForwardBatch.build(
        input_ids=[5, 6, 7, 8], positions=[4, 0, 1, 2], query_lens=[1, 3], seq_lens=[5, 3],
        block_tables=[[2, 7], [4]], block_size=4, device="cpu",
    )  # fmt: skip
    assert batch.slot_mapping.tolist() == [7 * 4 + 0, 16, 17, 18]
    assert batch.block_tables.tolist() == [[2, 7], [4, -1]] and batch.block_tables.dtype == torch.int32
    assert batch.cu_query_lens.tolist() == [0, 1, 4] and batch.seq_lens_t.tolist() == [5, 3]
    assert batch.sample_indices.tolist() == [0, 3]
    assert (batch.max_query_len, batch.max_seq_len, batch.num_tokens) == (3, 5, 4)
    with pytest.raises(ValueError, match="KV blocks of 4"):
        ForwardBatch.build(
            input_ids=[1], positions=[4], query_lens=[1], seq_lens=[5], block_tables=[[2]], block_size=4,
            device="cpu",
        )  # fmt: skip


@pytest.fixture(scope="module")
def triton_backend():
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from moefleet.engine.attention import kv_write
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend

    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kv_write._store_rows_kernel, InterpretedFunction):
            pytest.skip("Triton was imported before TRITON_INTERPRET was set: run this module alone")
    return TritonAttentionBackend()


def test_store_rows_matches_reference_and_skips_negative_slots(triton_backend):
    from moefleet.engine.attention.kv_write import store_rows, store_rows_reference

    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 6, 4, 3, 5, generator=g)  # [2, N, bs, Hk, D]: K half is a strided view
    rows = torch.randn(7, 15, generator=g)
    slots = torch.tensor([3, -1, 0, 23, 9, -1, 12])
    expected = kv.clone()
    store_rows_reference(expected[0].view(-1, 15), rows, slots)
    store_rows(kv[0].view(-1, 15), rows, slots)
    torch.testing.assert_close(kv, expected, atol=0, rtol=0)
    assert kv[1].equal(expected[1])  # the V half is untouched


class Pages:
    """Hands out shuffled blocks; builds ForwardBatches for steps of (seq, start, count)."""

    def __init__(self, num_blocks=16):
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}

    def batch(self, steps, backend):
        for seq, start, count in steps:
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < start + count:
                table.append(self.free.pop())
        return ForwardBatch.build(
            input_ids=[0] * sum(n for _, _, n in steps),
            positions=[p for _, a, n in steps for p in range(a, a + n)],
            query_lens=[n for _, _, n in steps],
            seq_lens=[a + n for _, a, n in steps],
            block_tables=[self.tables[s] for s, _, _ in steps],
            block_size=BLOCK,
            device="cpu",
            attn_backend=backend,
        )


def test_triton_gqa_matches_dense(triton_backend):
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, scale = 4, 2, 16, 0.25
    seq_q = {s: torch.randn(n, heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_k = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_v = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    attn = PagedAttention(heads, kv_heads, dim, scale)
    attn.kv_cache = torch.zeros(attn.kv_cache_shape(16, BLOCK))
    pages = Pages()
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in LENGTHS}
    for steps in STEPS:
        q = torch.cat([seq_q[s][a : a + n] for s, a, n in steps])
        k = torch.cat([seq_k[s][a : a + n] for s, a, n in steps])
        v = torch.cat([seq_v[s][a : a + n] for s, a, n in steps])
        out = attn(q, k, v, pages.batch(steps, triton_backend))
        for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
            outputs[s].append(piece)
    for s in LENGTHS:
        expected = dense_causal(seq_q[s], seq_k[s], seq_v[s], scale)
        torch.testing.assert_close(torch.cat(outputs[s]), expected, **TOL)
    # Without a cache (warm-up) the step attends within itself.
    attn.kv_cache = torch.empty(0)
    lens = [5, 3]
    q, k, v = seq_q[0][:8], seq_k[0][:8], seq_v[0][:8]
    out = attn(q, k, v, ForwardBatch.prefill_without_cache(lens, "cpu", triton_backend))
    torch.testing.assert_close(out[:5], dense_causal(q[:5], k[:5], v[:5], scale), **TOL)
    torch.testing.assert_close(out[5:], dense_causal(q[5:], k[5:], v[5:], scale), **TOL)


def _mla(seed=2):
    torch.manual_seed(seed)
    config = MLAConfig(32, 2, None, 16, 8, 4, 8, softmax_scale=12**-0.5)
    mla = MLAttention(config, RotaryEmbedding(4, 10000.0, interleaved=True))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mla


def test_triton_mla_matches_whole_sequences_and_torch_backend(triton_backend):
    """Mixed steps keep the decode row (seq1 in step 2) on the latent path; outputs equal MLA run on each
    whole sequence without a cache (expanded form), and the torch backend step by step."""
    mla = _mla()
    hidden = {s: torch.randn(n, 32) for s, n in LENGTHS.items()}
    reference = {
        s: mla(torch.arange(n), hidden[s], ForwardBatch.prefill_without_cache([n], "cpu"))
        for s, n in LENGTHS.items()
    }
    caches = {}
    outputs: dict[str, dict[int, list[torch.Tensor]]] = {}
    for name, backend in (("triton", triton_backend), ("torch", TorchAttentionBackend())):
        mla.kv_cache = torch.zeros(mla.kv_cache_shape(16, BLOCK))
        pages = Pages()
        outputs[name] = {s: [] for s in LENGTHS}
        for steps in STEPS:
            x = torch.cat([hidden[s][a : a + n] for s, a, n in steps])
            batch = pages.batch(steps, backend)
            out = mla(batch.positions, x, batch)
            for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
                outputs[name][s].append(piece)
        caches[name] = mla.kv_cache
    torch.testing.assert_close(caches["triton"], caches["torch"], atol=0, rtol=0)
    for s in LENGTHS:
        torch.testing.assert_close(torch.cat(outputs["triton"][s]), reference[s], **TOL)
        torch.testing.assert_close(torch.cat(outputs["triton"][s]), torch.cat(outputs["torch"][s]), **TOL)
    # The mixed step really split: its decode row went through the latent kernel.
    batch = Pages().batch(STEPS[0], triton_backend)
    meta = triton_backend.mla_metadata(batch, True, True)
    assert meta.decode is None and meta.extend is not None and meta.extend.row_index is None


def test_mla_mixed_step_splits_rows(triton_backend):
    pages = Pages()
    pages.batch(STEPS[0], triton_backend)
    batch = pages.batch(STEPS[1], triton_backend)
    meta = triton_backend.mla_metadata(batch, True, True)
    assert meta.decode is not None and meta.extend is not None
    assert meta.decode.row_index.tolist() == [10] and meta.decode.seq_lens.tolist() == [18]
    assert meta.extend.row_index.tolist() == list(range(10)) + list(range(11, 28))
    assert meta.extend.cu_kv_lens.tolist() == [0, 30, 47] and meta.extend.num_kv == 47
    from moefleet.engine.attention.triton_backend import context_slots

    slots = context_slots(meta.extend, BLOCK).tolist()
    table0, table2 = pages.tables[0], pages.tables[2]
    assert slots[:30] == [table0[p // BLOCK] * BLOCK + p % BLOCK for p in range(30)]
    assert slots[30:] == [table2[p // BLOCK] * BLOCK + p % BLOCK for p in range(17)]


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_triton_backend_greedy_generation_matches_transformers(name, triton_backend):
    """Whole tiny models through the Triton backend: chunked prefill, mixed steps and batched decode give
    transformers' greedy tokens (float32)."""
    transformers = pytest.importorskip("transformers")
    from moefleet.engine.loader import load_model
    from support.tiny_models import PagedDriver, tiny_model_dir

    from .test_models_parity import PROMPTS, hf_greedy

    path = tiny_model_dir(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts = {i: tok(p)["input_ids"] for i, p in enumerate(PROMPTS)}
    expected = {i: hf_greedy(hf, p, 6) for i, p in prompts.items()}
    model = load_model(path, "cpu", torch.float32)
    driver = PagedDriver(model, num_blocks=16, block_size=BLOCK, attn_backend=triton_backend)
    assert driver.generate(prompts, 6, prefill_chunks=2) == expected


def test_engine_with_triton_backend_equals_transformers(triton_backend):
    """The whole engine (ModelRunner.prepare -> ForwardBatch -> Triton backend) with a small token budget, so
    steps mix decodes with prompt chunks: greedy tokens equal transformers (float32)."""
    from moefleet.engine import LLM, SamplingParams
    from support.reference import transformers_greedy
    from support.tiny_models import tiny_model_dir

    path = tiny_model_dir("deepseek_grouped")
    prompts = [list(range(3, 23)), list(range(40, 47)), list(range(60, 90))]
    llm = LLM(
        str(path), attention_backend="triton", block_size=BLOCK, max_num_batched_tokens=12, max_num_seqs=4,
        max_model_len=128,
    )  # fmt: skip
    assert llm.engine.model_runner.attn_backend.name == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    got = [r.token_ids for r in llm.generate(prompts, params)]
    assert got == transformers_greedy(path, prompts, 5)


def dense_local(q, k, v, scale, window=None, sinks=None):
    """The formula for one whole sequence: causal (and p - W < j when windowed) softmax, with exp(sink_h)
    added to each head's denominator. q [L, H, D], k/v [L, Hk, D] -> [L, H, Dv]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(q.shape[0])
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks[:, None, None].expand(-1, q.shape[0], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize(("window", "with_sinks"), [(5, False), (None, True), (7, True)])
def test_sliding_window_and_sinks_match_the_formula(backend_name, window, with_sinks, request):
    """gpt-oss-style attention through both backends: mixed prefill / chunk / decode steps over pages."""
    if backend_name == "triton":
        backend = request.getfixturevalue("triton_backend")
    else:
        backend = TorchAttentionBackend()
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, scale = 4, 2, 16, 0.25
    sinks = torch.randn(heads, generator=g) if with_sinks else None
    seq_q = {s: torch.randn(n, heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_k = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_v = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    attn = PagedAttention(heads, kv_heads, dim, scale, sliding_window=window)
    attn.kv_cache = torch.zeros(attn.kv_cache_shape(16, BLOCK))
    pages = Pages()
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in LENGTHS}
    for steps in STEPS:
        q = torch.cat([seq_q[s][a : a + n] for s, a, n in steps])
        k = torch.cat([seq_k[s][a : a + n] for s, a, n in steps])
        v = torch.cat([seq_v[s][a : a + n] for s, a, n in steps])
        out = attn(q, k, v, pages.batch(steps, backend), sinks=sinks)
        for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
            outputs[s].append(piece)
    for s in LENGTHS:
        expected = dense_local(seq_q[s], seq_k[s], seq_v[s], scale, window, sinks)
        torch.testing.assert_close(torch.cat(outputs[s]), expected, **TOL)
    with pytest.raises(ValueError, match="sliding_window"):
        PagedAttention(heads, kv_heads, dim, scale, sliding_window=0)


def test_triton_mla_falls_back_to_the_reference_for_dims_tensor_cores_cannot_reduce():
    """Tiny MLA dims (rope 8) do not compile as tl.dot on a GPU: the Triton backend must use the torch path
    for such layers (same numbers), and keep its kernels for real shapes (DeepSeek-V3: 512 / 64 / 128 / 128)."""
    from types import SimpleNamespace

    from moefleet.engine.attention.triton_backend import mla_dims_supported

    deepseek = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    tiny = SimpleNamespace(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    assert mla_dims_supported(deepseek) and not mla_dims_supported(tiny)
