"""Grafana dashboards and Prometheus alert rules, generated from Python (grafana-foundation-sdk).

`python -m moefleet.operator.dashboards charts/moefleet` writes charts/moefleet/dashboards/*.json and
charts/moefleet/rules/moefleet.rules.yaml, which the chart ships as Grafana-sidecar ConfigMaps
(`dashboards.enabled`) and a PrometheusRule (`prometheusRules.enabled`). tests/operator/test_dashboards.py
checks the committed files equal what this module generates and that every query uses only metric names
the engine, gateway and operator export.

Series labels: `namespace`, `deployment`, `role`, `group`, `node_rank` come from the PodMonitor's
relabelings (render.render_pod_monitor); the gateway adds `role` and `code`/`state` itself.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SEL = 'namespace=~"$namespace",deployment=~"$deployment"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | heatmap | stat
    description: str = ""


def _q(expr: str, legend: str = "") -> tuple[str, str]:
    return (expr.replace("$sel", SEL).replace("$rate", RATE), legend)


def _quantiles(metric: str, by: str = "") -> tuple[tuple[str, str], ...]:
    group = f", {by}" if by else ""
    return tuple(
        _q(
            f"histogram_quantile({q}, sum by (le{group}) (rate({metric}_bucket{{$sel}}[$rate])))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.9, 0.99)
    )


DASHBOARDS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "moefleet-fleet": (
        "moefleet / Fleet overview",
        (
            Panel(
                "Groups serving, per role",
                (
                    _q(
                        "count by (role) (count by (role, group) (moefleet_num_requests_running{$sel}))",
                        "{{role}}",
                    ),
                ),
                description="Groups whose front end exports load (a group is down when it disappears).",
            ),
            Panel(
                "Requests / s, per role",
                (_q("sum by (role) (rate(moefleet_requests_total{$sel}[$rate]))", "{{role}}"),),
                "reqps",
            ),
            Panel(
                "Groups by phase, per role (operator)",
                (_q("sum by (role, phase) (moefleet_operator_groups{$sel})", "{{role}} {{phase}}"),),
                description="What kubectl get moed shows: Ready, Forming, Restarting, BackOff, Failed, "
                "Unschedulable (pending for lack of GPUs) groups.",
            ),
            Panel(
                "Group restarts (per hour)",
                (
                    _q(
                        "sum by (group) (increase(moefleet_operator_group_restarts_total{$sel}[1h]))",
                        "{{group}}",
                    ),
                ),
                description="Whole-group restarts by the operator; a group that keeps restarting is in a loop.",
            ),
            Panel("Time to first token", _quantiles("moefleet_time_to_first_token_seconds"), "s"),
            Panel("Inter-token latency", _quantiles("moefleet_inter_token_latency_seconds"), "s"),
            Panel(
                "Generated tokens / s, per role",
                (_q("sum by (role) (rate(moefleet_generation_tokens_total{$sel}[$rate]))", "{{role}}"),),
            ),
            Panel(
                "Lowest EPLB balancedness",
                (_q("min(moefleet_eplb_balancedness{$sel})", "lowest group"),),
                "percentunit",
                "stat",
            ),
        ),
    ),
    "moefleet-engine": (
        "moefleet / Engine",
        (
            Panel(
                "KV cache usage, per group",
                (_q("max by (group) (moefleet_kv_cache_usage_ratio{$sel})", "{{group}}"),),
                "percentunit",
            ),
            Panel(
                "Waiting requests (queue), per group",
                (_q("sum by (group) (moefleet_num_requests_waiting{$sel})", "{{group}}"),),
            ),
            Panel(
                "Running requests (batch), per group",
                (_q("sum by (group) (moefleet_num_requests_running{$sel})", "{{group}}"),),
            ),
            Panel(
                "Running requests per DP rank",
                (
                    _q(
                        "sum by (group, dp_rank) (moefleet_dp_rank_num_requests_running{$sel})",
                        "{{group}} rank {{dp_rank}}",
                    ),
                ),
            ),
            Panel(
                "Preemptions / s",
                (_q("sum by (group) (rate(moefleet_num_preemptions_total{$sel}[$rate]))", "{{group}}"),),
            ),
            Panel("End-to-end request latency", _quantiles("moefleet_e2e_request_latency_seconds"), "s"),
        ),
    ),
    "moefleet-moe": (
        "moefleet / MoE and EPLB",
        (
            Panel(
                "Balancedness per group",
                (_q("min by (group) (moefleet_eplb_balancedness{$sel})", "{{group}}"),),
                "percentunit",
            ),
            Panel(
                "Balancedness per MoE layer",
                (_q("avg by (layer) (moefleet_eplb_layer_balancedness{$sel})", "{{layer}}"),),
                "percentunit",
                "heatmap",
            ),
            Panel(
                "Rebalances (per hour)",
                (_q("sum by (group) (increase(moefleet_eplb_rebalances_total{$sel}[1h]))", "{{group}}"),),
            ),
            Panel("Rebalance pause", _quantiles("moefleet_eplb_rebalance_seconds"), "s"),
            Panel(
                "Routed (token, expert) assignments / s per rank",
                (
                    _q(
                        "sum by (group, rank) (rate(moefleet_eplb_routed_tokens_total{$sel}[$rate]))",
                        "{{group}} rank {{rank}}",
                    ),
                ),
            ),
        ),
    ),
    "moefleet-gateway": (
        "moefleet / Gateway and PD routing",
        (
            Panel(
                "Requests / s by role and code",
                (
                    _q(
                        "sum by (role, code) (rate(moefleet_gateway_requests_total{$sel}[$rate]))",
                        "{{role}} {{code}}",
                    ),
                ),
                "reqps",
            ),
            Panel("Upstream latency", _quantiles("moefleet_gateway_upstream_seconds", "role"), "s"),
            Panel(
                "Retries / s",
                (_q("sum by (role) (rate(moefleet_gateway_retries_total{$sel}[$rate]))", "{{role}}"),),
            ),
            Panel(
                "Backends by state",
                (_q("sum by (role, state) (moefleet_gateway_backends{$sel})", "{{role}} {{state}}"),),
            ),
        ),
    ),
    "moefleet-operator": (
        "moefleet / Operator",
        (
            Panel(
                "Kubernetes API requests / s",
                (
                    _q(
                        "sum by (verb, resource) (rate(moefleet_operator_api_requests_total[$rate]))",
                        "{{verb}} {{resource}}",
                    ),
                ),
                "reqps",
            ),
            Panel(
                "EPLB trigger decisions (per hour)",
                (
                    _q(
                        "sum by (outcome) (increase(moefleet_operator_eplb_decisions_total[1h]))",
                        "{{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Scaling decisions (per hour)",
                (
                    _q(
                        "sum by (role, outcome) (increase(moefleet_operator_scaling_decisions_total[1h]))",
                        "{{role}} {{outcome}}",
                    ),
                ),
                description="Autoscaler actions: scaled_up, drain_started, scaled_down, abandoned, "
                "skipped_no_data (status.autoscaling.<role>.reason says why).",
            ),
            Panel(
                "Autoscaled groups: current and desired",
                (
                    _q(
                        "sum by (deployment, role, kind) (moefleet_operator_autoscaling_groups{$sel})",
                        "{{deployment}} {{role}} {{kind}}",
                    ),
                ),
                description="desired below current while a group drains; above it while new groups wait "
                "for GPUs (see the Degraded condition).",
            ),
        ),
    ),
}

# (alert, expr, for, severity, summary, runbook line)
ALERTS: tuple[tuple[str, str, str, str, str, str], ...] = (
    (
        "MoefleetGroupDown",
        'count by (namespace, deployment, group) (up{group!=""} == 0) > 0',
        "5m",
        "critical",
        "Engine group {{ $labels.group }} has a pod Prometheus cannot scrape",
        "kubectl describe moed {{ $labels.deployment }}: the operator restarts the group; Degraded says why it cannot",
    ),
    (
        "MoefleetGroupRestartLoop",
        "sum by (namespace, deployment, group) (increase(moefleet_operator_group_restarts_total[30m])) >= 3",
        "1m",
        "warning",
        "Group {{ $labels.group }} was restarted 3 or more times in 30 minutes",
        "kubectl describe moed {{ $labels.deployment }}: status.groups[].lastFailure says why; the operator backs off "
        "and stops at spec.restartPolicy.maxRestarts (Degraded RestartLimit); fix the cause (image, model, memory)",
    ),
    (
        "MoefleetBalancednessLowWithoutRebalance",
        "min by (namespace, deployment, group) (moefleet_eplb_balancedness) < 0.8 and on (namespace, deployment, group) "
        "(max by (namespace, deployment, group) (increase(moefleet_eplb_rebalances_total[30m])) == 0)",
        "30m",
        "warning",
        "Group {{ $labels.group }} stays unbalanced and nothing rebalances it",
        "check condition EPLBReady and status.eplb.lastResult; spec.eplb.mode must be operator and the operator needs operator.prometheusUrl",
    ),
    (
        "MoefleetNoHealthyBackends",
        'sum by (namespace, deployment, role) (moefleet_gateway_backends{state="ready"}) == 0',
        "2m",
        "critical",
        "The gateway of {{ $labels.deployment }} has no ready {{ $labels.role }} group",
        "every group of the role is down or draining: kubectl get moed shows Ready groups; see the Degraded reason",
    ),
    (
        "MoefleetKVCacheSaturated",
        "max by (namespace, deployment, group) (moefleet_kv_cache_usage_ratio) > 0.95",
        "15m",
        "warning",
        "KV cache of {{ $labels.group }} is above 95% for 15 minutes",
        "requests queue and get preempted: add groups (spec.roles.<role>.replicas) or lower max context",
    ),
    (
        "MoefleetTTFTSLOBurn",
        "histogram_quantile(0.9, sum by (namespace, deployment, le) "
        "(rate(moefleet_time_to_first_token_seconds_bucket[5m]))) > 2",
        "10m",
        "warning",
        "p90 time to first token of {{ $labels.deployment }} is above 2 s",
        "look at the Engine dashboard's queue and KV usage; add prefill groups",
    ),
)


def _panel(panel: Panel) -> Any:
    from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries

    kinds: dict[str, Any] = {"timeseries": timeseries.Panel, "heatmap": heatmap.Panel, "stat": stat.Panel}
    builder: Any = kinds[panel.kind]()
    builder = builder.title(panel.title).unit(panel.unit).height(8).span(12)
    if panel.description:
        builder = builder.description(panel.description)
    for i, (expr, legend) in enumerate(panel.queries):
        target = prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i))
        if legend:
            target = target.legend_format(legend)
        builder = builder.with_target(target)
    return builder


def dashboard(uid: str) -> dict[str, Any]:
    from grafana_foundation_sdk.builders import dashboard as d
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    title, panels = DASHBOARDS[uid]
    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    builder = (
        d.Dashboard(title)
        .uid(uid)
        .tags(["moefleet"])
        .refresh("30s")
        .time("now-3h", "now")
        .with_variable(d.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            d.QueryVariable("namespace")
            .datasource(source)
            .query("label_values(moefleet_requests_total, namespace)")
            .include_all(True)
            .multi(True)
        )
        .with_variable(
            d.QueryVariable("deployment")
            .datasource(source)
            .query('label_values(moefleet_requests_total{namespace=~"$namespace"}, deployment)')
            .include_all(True)
            .multi(True)
        )
    )
    for panel in panels:
        builder = builder.with_panel(_panel(panel).datasource(source))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder, sort_keys=True))


def rules() -> dict[str, Any]:
    """The PrometheusRule spec (groups)."""
    return {
        "groups": [
            {
                "name": "moefleet",
                "rules": [
                    {
                        "alert": name,
                        "expr": expr,
                        "for": duration,
                        "labels": {"severity": severity},
                        "annotations": {"summary": summary, "runbook": runbook},
                    }
                    for name, expr, duration, severity, summary, runbook in ALERTS
                ],
            }
        ]
    }


def all_queries() -> list[str]:
    """Every PromQL expression in the dashboards (panels and variables) and the rules."""
    out = [expr for _, panels in DASHBOARDS.values() for p in panels for expr, _ in p.queries]
    out += [
        "moefleet_requests_total",  # the variables' label_values() source
        *(expr for _, expr, *_ in ALERTS),
    ]
    return out


def write(chart: Path) -> list[Path]:
    written = []
    (chart / "dashboards").mkdir(exist_ok=True)
    for uid in DASHBOARDS:
        path = chart / "dashboards" / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid), indent=1, sort_keys=True) + "\n")
        written.append(path)
    (chart / "rules").mkdir(exist_ok=True)
    path = chart / "rules" / "moefleet.rules.yaml"
    path.write_text(
        "# Generated by `python -m moefleet.operator.dashboards charts/moefleet`: do not edit.\n"
        + yaml.safe_dump(rules(), sort_keys=False, width=200)
    )
    written.append(path)
    return written


if __name__ == "__main__":
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "charts/moefleet")):
        print(p)
