"""render: golden files show the exact objects per example manifest; invariants checked independently.

Regenerate the golden files after an intended change with
    MOEFLEET_UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_render.py
and review the diff (git diff tests/operator/data/).
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import yaml
from moefleet.operator import labels as L
from moefleet.operator import render
from moefleet.operator.spec import parse
from support.operator_catalogue import DATA, MANIFESTS, load_manifest, merge

UPDATE = os.environ.get("MOEFLEET_UPDATE_GOLDEN") == "1"


def _spec(path, **overrides):
    body = load_manifest(path, namespace="llm")
    return parse(merge(body, overrides), default_image="ghcr.io/moefleet/moefleet:0.1.0")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_golden(path):
    objects = render.render_all(_spec(path), pod_monitor_supported=True)
    text = yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)
    golden = DATA / f"render-{path.stem}.yaml"
    if UPDATE:
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}: run with MOEFLEET_UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text(), (
        f"render changed; if intended regenerate with MOEFLEET_UPDATE_GOLDEN=1 ({golden})"
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_invariants(path):
    spec = _spec(path)
    objects = render.render_all(spec, pod_monitor_supported=False)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate children"
    assert not any(kind == "PodMonitor" for kind, _ in names)
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["ownerReferences"][0]["uid"] == spec.uid and meta["ownerReferences"][0]["controller"]
        assert (
            meta["labels"][L.DEPLOYMENT] == spec.name and meta["labels"][L.MANAGED_BY] == L.MANAGED_BY_VALUE
        )
        assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"][L.SPEC_HASH])
    statefulsets = [o for o in objects if o["kind"] == "StatefulSet"]
    assert len(statefulsets) == sum(r.replicas for r in spec.roles)
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for sts in statefulsets:
        role = spec.role(sts["metadata"]["labels"][L.ROLE])
        pod = sts["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert sts["spec"]["replicas"] == role.nodes_per_replica
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert container["resources"]["limits"][L.GPU_RESOURCE] == role.gpus_per_node
        # The selector selects the template's pods, and the headless Service exists under serviceName.
        assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        headless = services[sts["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
        args = container["args"]
        flag = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
        assert flag["--nnodes"] == str(role.nodes_per_replica)
        assert flag["--nproc-per-node"] == str(role.gpus_per_node)
        assert flag["--node-rank"] == "$(MOEFLEET_NODE_RANK)"
        # MASTER_ADDR is pod 0 of this StatefulSet behind its headless Service.
        assert flag["--master-addr"] == f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}.llm.svc"
        env = {e["name"]: e for e in container["env"]}
        assert (
            env["MOEFLEET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
            == f"metadata.labels['{L.POD_INDEX}']"
        )
        assert env["MOEFLEET_ROLE"]["value"] == role.name
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        if role.node_selector:
            assert pod["spec"]["nodeSelector"] == dict(role.node_selector)
    config = json.loads(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["config.json"])
    assert set(config["roles"]) == {r.name for r in spec.roles}
    for role in spec.roles:
        assert len(config["roles"][role.name]["groups"]) == role.replicas
    gateway = next(o for o in objects if o["kind"] == "Deployment")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["command"] == ["moefleet", "gateway"]


def test_hash_is_stable_and_tracks_changes():
    path = MANIFESTS[0]
    first = render.render_statefulset(_spec(path), "prefill", 0)
    again = render.render_statefulset(_spec(path), "prefill", 0)
    changed = render.render_statefulset(_spec(path, spec={"image": "other:2"}), "prefill", 0)
    assert first == again  # rendering is deterministic (two separate parses and renders)
    assert first["metadata"]["annotations"][L.SPEC_HASH] != changed["metadata"]["annotations"][L.SPEC_HASH]
    hashes = [o["metadata"]["annotations"][L.SPEC_HASH] for o in render.render_all(_spec(path), False)]
    assert len(set(hashes)) == len(hashes)  # every child has its own content


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": "1"}),
        lambda o: o["spec"].update(replicas=o["spec"]["replicas"] + 1),
        lambda o: o["metadata"]["labels"].update({"extra": "label"}),
        lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=31),
    ],
)
def test_hash_changes_with_any_field_and_ignores_only_its_own_annotation(edit):
    sts = render.render_statefulset(_spec(MANIFESTS[0]), "prefill", 0)
    recorded = sts["metadata"]["annotations"][L.SPEC_HASH]
    edited = copy.deepcopy(sts)
    edit(edited)
    assert render.object_hash(edited) != recorded
    edited_annotation = copy.deepcopy(sts)
    edited_annotation["metadata"]["annotations"][L.SPEC_HASH] = "0" * 16
    assert render.object_hash(edited_annotation) == recorded


def test_role_budget_allows_one_disruption_over_all_groups_of_the_role():
    spec = _spec(
        next(p for p in MANIFESTS if p.stem == "deepseek-r1-reference"),
        spec={"roles": {"decode": {"replicas": 3}}},
    )
    objects = render.render_all(spec, False)
    pdbs = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert sorted(pdbs) == ["deepseek-r1-decode", "deepseek-r1-prefill"]  # one per role, none per group
    decode = pdbs["deepseek-r1-decode"]
    assert decode["maxUnavailable"] == 1 and decode["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # It selects every engine pod of the role (all three groups) and nothing else.
    for obj in objects:
        if obj["kind"] != "StatefulSet":
            continue
        pod_labels = obj["spec"]["template"]["metadata"]["labels"]
        selected = decode["selector"]["matchLabels"].items() <= pod_labels.items()
        assert selected == (pod_labels[L.ROLE] == "decode"), obj["metadata"]["name"]
    gateway = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not decode["selector"]["matchLabels"].items() <= gateway.items()


def test_scaling_one_role_leaves_other_groups_byte_identical():
    path = next(p for p in MANIFESTS if p.stem == "deepseek-r1-reference")
    before = {(o["kind"], o["metadata"]["name"]): o for o in render.render_all(_spec(path), False)}
    after = {
        (o["kind"], o["metadata"]["name"]): o
        for o in render.render_all(_spec(path, spec={"roles": {"decode": {"replicas": 3}}}), False)
    }
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("ConfigMap", "deepseek-r1-gateway")}  # only the gateway's group list
    added = set(after) - set(before)
    kinds = ("StatefulSet", "Service", "NetworkPolicy")  # a group's NetworkPolicy is named after it
    assert added == {(kind, f"deepseek-r1-decode-{i}") for i in (1, 2) for kind in kinds}


def test_pvc_and_user_resources_are_rendered():
    path = next(p for p in MANIFESTS if p.stem == "kimi-k2-h200")
    sts = render.render_statefulset(_spec(path), "decode", 0)
    pod = sts["spec"]["template"]["spec"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "kimi-k2-weights", "readOnly": True},
    } in pod["volumes"]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "32", "memory": "512Gi"}
    assert pod["tolerations"][0]["key"] == L.GPU_RESOURCE


def test_one_ready_service_lists_the_rank0_pods_of_every_role_and_nothing_else():
    """The gateway's discovery: one Service per deployment (not per role) over Ready rank-0 engine pods. The
    gateway keeps a group when the group's own rank-0 address is listed (engine/gateway/pool.py), so the
    Service must select every group's rank-0 pod and no other pod."""
    spec = _spec(next(p for p in MANIFESTS if p.stem == "deepseek-r1-reference"))
    objects = render.render_all(spec, pod_monitor_supported=False)
    config = json.loads(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["config.json"])
    names = {role["service"] for role in config["roles"].values()}
    assert names == {f"{spec.name}-ready.{spec.namespace}.svc"} and len(config["roles"]) == 2
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    groups = sum(r.replicas for r in spec.roles)
    assert len(services) == groups + 2  # a headless Service per group, the ready one, the gateway's
    ready = services[f"{spec.name}-ready"]["spec"]
    assert ready["clusterIP"] == "None" and not ready["publishNotReadyAddresses"]

    def selected(labels):
        return ready["selector"].items() <= labels.items()

    for sts in (o for o in objects if o["kind"] == "StatefulSet"):
        pod = sts["spec"]["template"]["metadata"]["labels"]
        assert selected({**pod, L.POD_INDEX: "0"}), sts["metadata"]["name"]  # rank 0 (the controller's label)
        assert not selected({**pod, L.POD_INDEX: "1"})  # other ranks
    gateway = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selected({**gateway, L.POD_INDEX: "0"})
    other = render.render_statefulset(_spec(MANIFESTS[0]), "prefill", 0)  # another deployment's pods
    if _spec(MANIFESTS[0]).name != spec.name:
        assert not selected({**other["spec"]["template"]["metadata"]["labels"], L.POD_INDEX: "0"})
