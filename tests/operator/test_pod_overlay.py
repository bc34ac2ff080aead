"""Pod template overlay: strategic-merge semantics (hand-written expected results, as `kubectl patch --type
strategic` documents them), refusal of operator-owned fields naming the field, and the render with overlays."""

from __future__ import annotations

import pytest
from moefleet.operator import labels as L
from moefleet.operator import render
from moefleet.operator.pod_overlay import OverlayError, apply_overlays, check_overlay, strategic_merge
from moefleet.operator.spec import SpecError, parse
from support.operator_catalogue import MANIFESTS, load_manifest, merge, valid_base


def test_maps_merge_and_null_deletes():
    base = {"a": 1, "b": {"c": 2, "d": 3}}
    assert strategic_merge(base, {"b": {"c": 9, "d": None}, "e": 5}) == {"a": 1, "b": {"c": 9}, "e": 5}
    assert base == {"a": 1, "b": {"c": 2, "d": 3}}  # inputs untouched


def test_lists_with_a_merge_key_merge_by_it_and_append_new_items():
    base = {
        "containers": [
            {"name": "engine", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
        ],
        "volumes": [{"name": "dshm", "emptyDir": {}}],
    }
    patch = {
        "containers": [
            {"name": "engine", "env": [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}]},
            {"name": "sidecar", "image": "s"},
        ],
        "volumes": [{"name": "rdma", "hostPath": {"path": "/dev/infiniband"}}],
    }
    assert strategic_merge(base, patch) == {
        "containers": [
            {
                "name": "engine",
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "B", "value": "20"},
                    {"name": "C", "value": "3"},
                ],
            },
            {"name": "sidecar", "image": "s"},
        ],
        "volumes": [
            {"name": "dshm", "emptyDir": {}},
            {"name": "rdma", "hostPath": {"path": "/dev/infiniband"}},
        ],
    }


def test_volume_mounts_merge_by_mount_path_and_lists_without_a_key_are_replaced():
    base = {
        "volumeMounts": [{"name": "a", "mountPath": "/a"}],
        "tolerations": [{"key": "x", "operator": "Exists"}],
        "capabilities": {"drop": ["ALL"]},
    }
    patch = {
        "volumeMounts": [
            {"name": "a", "mountPath": "/a", "readOnly": True},
            {"name": "b", "mountPath": "/b"},
        ],
        "tolerations": [{"key": "y", "operator": "Exists"}],
        "capabilities": {"add": ["IPC_LOCK"]},
    }
    assert strategic_merge(base, patch) == {
        "volumeMounts": [
            {"name": "a", "mountPath": "/a", "readOnly": True},
            {"name": "b", "mountPath": "/b"},
        ],
        "tolerations": [{"key": "y", "operator": "Exists"}],  # no merge key: replaced, as Kubernetes does
        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
    }


def test_privileged_overlay_drops_the_rendered_no_escalation_default():
    template = {
        "spec": {"containers": [{"name": "engine", "securityContext": {"allowPrivilegeEscalation": False}}]}
    }
    overlay = {"spec": {"containers": [{"name": "engine", "securityContext": {"privileged": True}}]}}
    merged = apply_overlays(template, (overlay,))
    assert merged["spec"]["containers"][0]["securityContext"] == {"privileged": True}


@pytest.mark.parametrize(
    ("overlay", "field"),
    [
        ({"metadata": {"labels": {"moefleet.ai/group": "x"}}}, "P.metadata.labels[moefleet.ai/group]"),
        (
            {"metadata": {"labels": {"app.kubernetes.io/name": "x"}}},
            "P.metadata.labels[app.kubernetes.io/name]",
        ),
        ({"metadata": {"name": "x"}}, "P.metadata"),
        ({"kind": "Pod"}, "P.kind"),
        ({"spec": {"containers": [{"name": "engine", "ports": []}]}}, "P.spec.containers[engine].ports"),
        ({"spec": {"containers": [{"name": "engine", "args": ["x"]}]}}, "P.spec.containers[engine].args"),
        ({"spec": {"containers": [{"name": "engine", "image": "x"}]}}, "P.spec.containers[engine].image"),
        (
            {"spec": {"containers": [{"name": "engine", "livenessProbe": {}}]}},
            "P.spec.containers[engine].livenessProbe",
        ),
        (
            {
                "spec": {
                    "containers": [{"name": "engine", "env": [{"name": "MOEFLEET_NODE_RANK", "value": "0"}]}]
                }
            },
            "P.spec.containers[engine].env[MOEFLEET_NODE_RANK]",
        ),
        (
            {"spec": {"containers": [{"name": "side", "env": [{"name": "POD_IP", "value": "1"}]}]}},
            "P.spec.containers[side].env[POD_IP]",
        ),
        (
            {"spec": {"containers": [{"name": "engine", "resources": {"limits": {L.GPU_RESOURCE: 4}}}]}},
            f"P.spec.containers[engine].resources.limits[{L.GPU_RESOURCE}]",
        ),
        ({"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "P.spec.volumes[dshm]"),
        ({"spec": {"readinessGates": []}}, "P.spec.readinessGates"),
        ({"spec": {"terminationGracePeriodSeconds": 5}}, "P.spec.terminationGracePeriodSeconds"),
        ({"spec": {"containers": [{"image": "no-name"}]}}, "P.spec.containers"),
        ({"spec": {"$patch": "replace"}}, "P.spec.$patch"),
    ],
)
def test_owned_or_malformed_fields_are_refused_naming_the_field(overlay, field):
    with pytest.raises(OverlayError) as error:
        check_overlay(overlay, "P")
    assert error.value.field == field


def test_user_fields_are_accepted():
    check_overlay(
        {
            "metadata": {"labels": {"team": "llm"}, "annotations": {"k8s.v1.cni.cncf.io/networks": "ib"}},
            "spec": {
                "hostNetwork": True,
                "hostIPC": True,
                "priorityClassName": "serving",
                "schedulerName": "custom",
                "imagePullSecrets": [{"name": "regcred"}],
                "containers": [
                    {
                        "name": "engine",
                        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                        "resources": {"limits": {"rdma/hca": 1}},
                        "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
                        "envFrom": [{"secretRef": {"name": "s"}}],
                    }
                ],
            },
        },
        "P",
    )


def _spec(body_patch):
    return parse(merge(valid_base(), body_patch))


def test_spec_parse_names_the_overlay_field_of_the_role():
    with pytest.raises(SpecError) as error:
        _spec(
            {
                "spec": {
                    "roles": {
                        "decode": {"podTemplate": {"spec": {"containers": [{"name": "engine", "ports": []}]}}}
                    }
                }
            }
        )
    assert error.value.field == "spec.roles.decode.podTemplate.spec.containers[engine].ports"


def test_render_applies_global_then_role_overlay_and_keeps_owned_fields():
    spec = _spec(
        {
            "spec": {
                "podTemplate": {
                    "metadata": {"labels": {"team": "llm"}},
                    "spec": {
                        "priorityClassName": "global",
                        "containers": [
                            {
                                "name": "engine",
                                "resources": {"limits": {"rdma/hca": 1}},
                                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                            }
                        ],
                    },
                },
                "roles": {
                    "decode": {
                        "podTemplate": {
                            "spec": {
                                "priorityClassName": "decode",
                                "hostIPC": True,
                                "tolerations": [{"key": "ib", "operator": "Exists"}],
                                "volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband"}}],
                                "containers": [
                                    {
                                        "name": "engine",
                                        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                                        "volumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband"}],
                                    }
                                ],
                            }
                        }
                    }
                },
            }
        }
    )
    plain = render.render_statefulset(parse(valid_base()), "decode", 0)["spec"]["template"]
    prefill = render.render_statefulset(spec, "prefill", 0)["spec"]["template"]
    decode = render.render_statefulset(spec, "decode", 0)["spec"]["template"]
    assert prefill["spec"]["priorityClassName"] == "global" and "hostIPC" not in prefill["spec"]
    assert decode["spec"]["priorityClassName"] == "decode" and decode["spec"]["hostIPC"] is True
    assert decode["metadata"]["labels"]["team"] == "llm"
    # Owned labels are all still there with their values.
    assert plain["metadata"]["labels"].items() <= decode["metadata"]["labels"].items()
    engine = decode["spec"]["containers"][0]
    plain_engine = plain["spec"]["containers"][0]
    assert engine["resources"]["limits"] == {L.GPU_RESOURCE: 8, "rdma/hca": 1}
    assert engine["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in engine["env"]}
    assert env["NCCL_DEBUG"]["value"] == "INFO"  # a default, overridden by the overlay in place
    assert [e["name"] for e in engine["env"]] == [e["name"] for e in plain_engine["env"]]  # same order
    assert {k: engine[k] for k in ("args", "ports", "image", "command")} == {
        k: plain_engine[k] for k in ("args", "ports", "image", "command")
    }
    assert [v["name"] for v in decode["spec"]["volumes"]] == [v["name"] for v in plain["spec"]["volumes"]] + [
        "ib"
    ]
    assert decode["spec"]["tolerations"] == [{"key": "ib", "operator": "Exists"}]
    assert decode["spec"]["readinessGates"] == plain["spec"]["readinessGates"]


def test_gateway_overlay_goes_on_the_gateway_only():
    spec = _spec({"spec": {"gateway": {"podTemplate": {"spec": {"priorityClassName": "edge"}}}}})
    gateway = render.render_gateway_deployment(spec)["spec"]["template"]["spec"]
    assert gateway["priorityClassName"] == "edge"
    assert "priorityClassName" not in render.render_statefulset(spec, "decode", 0)["spec"]["template"]["spec"]


def test_example_deepseek_overlay_adds_rdma_and_ipc_lock():
    path = next(p for p in MANIFESTS if p.stem == "deepseek-r1-reference")
    spec = parse(load_manifest(path), default_image="img")
    for role in ("prefill", "decode"):
        pod = render.render_statefulset(spec, role, 0)["spec"]["template"]["spec"]
        engine = pod["containers"][0]
        assert engine["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
        assert "IPC_LOCK" in engine["securityContext"]["capabilities"]["add"]
        assert pod["nodeSelector"] == {L.GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"][0]["key"] == L.GPU_RESOURCE
