"""Turn per-rank benchmark results into one summary row and a printed table (pure)."""

from __future__ import annotations

from typing import Any

PARTS = ("attention", "dispatch", "experts", "combine", "other")


def summarize(options: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: the slowest rank sets the group's step time (ranks run in lockstep)."""
    slowest = max(ranks, key=lambda r: r["step_time_s"])
    step = slowest["step_time_s"]
    tokens = slowest["tokens_per_step"]
    bandwidth = min(r["bandwidth_bytes_per_s"] for r in ranks)
    floor_s = (
        max(r["floor_bytes"]["total"] for r in ranks) / bandwidth if options["mode"] == "decode" else None
    )
    return {
        "preset": options["preset"],
        "layers": options["num_layers"],
        "gpus": slowest["world_size"],
        "emulate_comm_us": options.get("emulate_comm_us", 0.0),  # emulated transfers are in the step
        "device": slowest["device_name"],
        "mode": options["mode"],
        "batch": options["batch_size"] if options["mode"] == "decode" else options["prefill_tokens"],
        "kv_len": options["kv_len"] if options["mode"] == "decode" else options["prefill_seq_len"],
        "step_ms": step * 1e3,
        "tokens_per_s_per_gpu": tokens / step,
        "breakdown_ms": {p: slowest["breakdown_s"].get(p, 0.0) * 1e3 for p in PARTS},
        "kv_capacity_tokens_per_gpu": min(r["kv_capacity_tokens"] for r in ranks),
        "bandwidth_gb_s": bandwidth / 1e9,
        "hbm_floor_ms": None if floor_s is None else floor_s * 1e3,
        "floor_ratio": None if floor_s is None else floor_s / step,
        "prepare_ms": slowest.get("prepare_time_s", 0.0) * 1e3,
        "attention_backend": slowest.get("attention_backend", ""),
        "cuda_graphs": slowest.get("cuda_graphs", ""),
        "tflops_per_gpu": slowest.get("flops_per_step", 0) / step / 1e12,
        "mfu": _mfu(options, slowest, step),
        "host_syncs_per_step": slowest.get("host_syncs_per_step"),
        "emulated_ep": slowest.get("emulated_ep", 0),
        "experts_per_gpu": slowest.get("experts_per_gpu", 0),
        "routed_rows_per_layer": slowest.get("routed_rows_per_layer", 0),
        # measured (EP group / --emulate-ep): the busiest GPU's rows per MoE layer in the check step
        "received_rows_per_layer": max(r.get("received_rows_per_layer", 0.0) for r in ranks),
        **graph_timeline_fields(slowest.get("graph_timeline") or {}),
    }


def graph_timeline_fields(timeline: dict[str, Any]) -> dict[str, Any]:
    """--tbo-timeline with graphs (trace_timeline.graph_timeline): the profiled replays' GPU span per step, the
    share of the comm kernels' time other kernels ran under, and the comm kernels' summed time per step (the
    emulated transfer waits actually spent); None without a graph timeline."""
    if not timeline:
        return dict.fromkeys(("graph_step_ms_profiled", "graph_comm_hidden_pct", "graph_comm_kernel_ms"))
    return {
        "graph_step_ms_profiled": timeline["span_us"] / 1e3,
        "graph_comm_hidden_pct": 100 * timeline["hidden_share"],
        "graph_comm_kernel_ms": timeline["comm_kernel_sum_us"] / 1e3,
    }


def _mfu(options: dict[str, Any], rank: dict[str, Any], step_s: float) -> float | None:
    """Prefill: useful FLOPs per second (flops.py) over the device's dense bf16 peak."""
    peak = rank.get("peak_flops")
    if options["mode"] != "prefill" or not peak or not rank.get("flops_per_step"):
        return None
    return float(rank["flops_per_step"] / step_s / peak)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per summary row."""
    head = (
        "| preset | layers | GPUs | mode | batch/GPU | len | step ms | tok/s/GPU | attn ms | dispatch ms | "
        "experts ms | combine ms | other ms | KV tokens/GPU | HBM floor ms | floor/step | prep ms | "
        "TFLOP/s | MFU | attn | graphs | syncs/step |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r["breakdown_ms"]
        floor = "-" if r["hbm_floor_ms"] is None else f"{r['hbm_floor_ms']:.2f}"
        ratio = "-" if r["floor_ratio"] is None else f"{r['floor_ratio']:.1%}"
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        graphs = (r.get("cuda_graphs") or "-").split(":")[0]
        syncs = "-" if r.get("host_syncs_per_step") is None else str(r["host_syncs_per_step"])
        lines.append(
            f"| {r['preset']} | {r['layers']} | {_gpus(r)} | {r['mode']} | {r['batch']} | {r['kv_len']} | "
            f"{r['step_ms']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | {b['attention']:.2f} | "
            f"{b['dispatch']:.2f} | {b['experts']:.2f} | {b['combine']:.2f} | {b['other']:.2f} | "
            f"{r['kv_capacity_tokens_per_gpu']:,} | {floor} | {ratio} | {r.get('prepare_ms', 0.0):.2f} | "
            f"{r.get('tflops_per_gpu', 0.0):.1f} | {mfu} | {r.get('attention_backend') or '-'} | {graphs} | "
            f"{syncs} |"
        )
    return "\n".join(lines)


def _gpus(row: dict[str, Any]) -> str:
    emulated = row.get("emulated_ep", 0)
    return f"{row['gpus']} (as EP{emulated})" if emulated else str(row["gpus"])


def eplb_summary(ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """--eplb: the group's step time (slowest rank) before and after the rebalance, balancedness, pauses."""
    if not ranks or not ranks[0].get("eplb"):
        return None
    import statistics

    def group_step(key: str) -> float:
        return max(statistics.median(r["eplb"][key]) for r in ranks)

    first = ranks[0]["eplb"]
    pauses = [
        max(r["eplb"]["pause_per_layer_ms"][i] for r in ranks)
        for i in range(len(first["pause_per_layer_ms"]))
    ]
    before, after = group_step("step_times_before_s"), group_step("step_times_after_s")
    return {
        "step_ms_before": before * 1e3,
        "step_ms_after": after * 1e3,
        "speedup": before / after,
        "balancedness_before": first["balancedness_before"],
        "predicted_balancedness": first["predicted_balancedness"],
        "balancedness_after": first["balancedness_after"],
        "max_pause_per_layer_ms": max(pauses, default=0.0),
        "moved_experts": first["moved_experts"],
    }


def format_eplb_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | GPUs | mode | step ms before | step ms after | speedup | balancedness before | predicted | "
        "after | max pause/layer ms | moved experts |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = r["eplb"]
        lines.append(
            f"| {r['preset']} | {r['gpus']} | {r['mode']} | {e['step_ms_before']:.2f} | {e['step_ms_after']:.2f} | "
            f"{e['speedup']:.2f}x | {e['balancedness_before']:.3f} | {e['predicted_balancedness']:.3f} | "
            f"{e['balancedness_after']:.3f} | {e['max_pause_per_layer_ms']:.2f} | {e['moved_experts']} |"
        )
    return "\n".join(lines)


def projection_row(
    rows: list[dict[str, Any]], layers: int, dense_layers: int, comm_us_per_layer: float
) -> dict[str, Any]:
    """`--project-layers`: fit the step time over the rows' depths (same scenario) and project `layers`."""
    from moefleet.engine.bench.projection import REFERENCE, bandwidth_note, fit_depths, project

    fit = fit_depths([(r["layers"], r["step_ms"] / 1e3) for r in rows])
    first = rows[0]
    tokens = first["batch"]  # tokens per GPU per step: decode sequences, or prefill tokens
    proj = project(fit, layers, tokens, layers - dense_layers, comm_us_per_layer / 1e6)
    reference = REFERENCE[first["mode"]]
    return {
        "preset": first["preset"],
        "mode": first["mode"],
        "emulated_ep": first.get("emulated_ep", 0) or first["gpus"],
        "gpus": first["gpus"],  # real GPUs measured (> 1: the step includes dispatch/combine between them)
        "emulate_comm_us": first.get("emulate_comm_us", 0.0),
        "experts_per_gpu": first.get("experts_per_gpu", 0),
        "routed_rows_per_layer": first.get("routed_rows_per_layer", 0),
        "tokens_per_gpu": tokens,
        "depths": {r["layers"]: r["step_ms"] for r in rows},
        "slope_ms_per_layer": fit.slope_s * 1e3,
        "intercept_ms": fit.intercept_s * 1e3,
        "layers": layers,
        "comm_ms": proj.comm_s * 1e3,
        "projected_step_ms": proj.step_s * 1e3,
        "projected_tokens_per_s_per_gpu": proj.tokens_per_s,
        "reference_tokens_per_s_per_gpu": reference.tokens_per_s_per_gpu,
        "reference": reference.what,
        "bandwidth_note": bandwidth_note(first["device"]),
    }


def format_projection_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | mode | EP | experts/GPU | rows/GPU/layer | tokens/GPU | step ms by depth | slope ms/layer | "
        "intercept ms | layers | comm ms | projected step ms | projected tok/s/GPU | reference tok/s/GPU |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes: list[str] = []
    for r in rows:
        depths = ", ".join(f"{d}: {ms:.2f}" for d, ms in sorted(r["depths"].items()))
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['emulated_ep']} | {r['experts_per_gpu']} | "
            f"{r['routed_rows_per_layer']:,} | {r['tokens_per_gpu']:,} | {depths} | {r['slope_ms_per_layer']:.3f} | "
            f"{r['intercept_ms']:.2f} | {r['layers']} | {r['comm_ms']:.2f} | {r['projected_step_ms']:.2f} | "
            f"{r['projected_tokens_per_s_per_gpu']:,.0f} | {r['reference_tokens_per_s_per_gpu']:,.0f} |"
        )
        for note in (f"reference ({r['mode']}): {r['reference']}", r["bandwidth_note"]):
            if note not in notes:
                notes.append(note)
    if any(r["comm_ms"] == 0 and r.get("gpus", 1) == 1 and not r.get("emulate_comm_us") for r in rows):
        notes.append(
            "comm ms 0: an emulated step has no dispatch/combine communication; add it with --comm-us-per-layer"
        )
    for r in rows:
        gpus, ep = r.get("gpus", 1), r["emulated_ep"]
        note = (
            f"EP{ep} emulated on {gpus} GPUs: the steps include dispatch/combine between them (remote share "
            f"{(gpus - 1) / gpus:.0%} of the rows vs {(ep - 1) / ep:.1%} at EP{ep}); comm ms is added on top"
        )
        if gpus > 1 and ep > gpus and note not in notes:
            notes.append(note)
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
