"""`rlhf_operator.kube` declares, for each API call, the request it makes; the chart's RBAC is
derived from that registry, so here each function is run against the emulator and must send
exactly the request (group, resource, verb) it declares — and every API-calling function must
be registered."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import kmock
from kube_sim import RLHFEmulator, create_job, sample_job
from rlhf_operator import builders, kube, names
from rlhf_operator.reconcile import progress

NS = "ns"
VERBS = {
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
    kmock.action.FETCH: "get",
    kmock.action.LIST: "list",
}


def _cluster(name: str) -> dict[str, Any]:
    return {
        "apiVersion": names.RAY_API_VERSION,
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": NS},
    }


def _rayjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": names.RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": NS},
    }


# One sample call per registered function (a new function without a case fails the test).
CALLS: dict[str, Callable[[], Any]] = {
    "create_raycluster": lambda: kube.create_raycluster(_cluster("c2")),
    "delete_raycluster": lambda: kube.delete_raycluster(NS, "c1"),
    "patch_raycluster": lambda: kube.patch_raycluster(
        NS, "c1", {"metadata": {"labels": {"a": "b"}}}
    ),
    "delete_raycluster_unchanged": lambda: kube.delete_raycluster_unchanged(NS, "c1", "0"),
    "create_rayjob": lambda: kube.create_rayjob(_rayjob("j2")),
    "delete_rayjob": lambda: kube.delete_rayjob(NS, "j1"),
    "patch_job_status": lambda: kube.patch_job_status(NS, "demo", {"phase": "Running"}),
    "annotate_job": lambda: kube.annotate_job(NS, "demo", {"a": "b"}),
    "get_job": lambda: kube.get_job(NS, "demo"),
    "delete_job": lambda: kube.delete_job(NS, "demo"),
    "list_cluster_pods": lambda: kube.list_cluster_pods(NS, "c1"),
    "list_pod_warnings": lambda: kube.list_pod_warnings(NS, "c1-head-x"),
    "create_progress": lambda: kube.create_progress(
        progress.build_progress("demo", NS, builders.owner_reference({"name": "demo", "uid": "u"}))
    ),
    "create_network_policy": lambda: kube.create_network_policy(
        builders.build_network_policy("c1", NS, "uid-1", ["ray-system"])
    ),
}


def test_every_function_that_calls_the_api_is_registered() -> None:
    calls_api = {
        name
        for name, fn in inspect.getmembers(kube, inspect.isfunction)
        if fn.__module__ == kube.__name__
        and not name.startswith("_")
        and any(
            s in inspect.getsource(fn)
            for s in ("_custom()", "_core()", "_networking()", "_create(", "_delete(")
        )
    }
    assert calls_api == set(kube.API_CALLS)
    assert set(CALLS) == set(kube.API_CALLS), "add a sample call for the new kube function"


async def test_each_function_sends_only_the_request_it_declares(api: RLHFEmulator) -> None:
    kube.configure()  # $KUBECONFIG points at the emulator (conftest)
    for name, call in CALLS.items():
        await create_job(api, sample_job("demo"))  # fresh objects for every call
        await asyncio.to_thread(kube.create_raycluster, _cluster("c1"))
        await asyncio.to_thread(kube.create_rayjob, _rayjob("j1"))
        seen = len(list(api))
        await asyncio.to_thread(call)
        made = {
            (r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""),
             VERBS[r.action])
            for r in list(api)[seen:]
            if r.resource is not None and r.action in VERBS
        }  # fmt: skip
        declared = kube.API_CALLS[name]
        assert made == {(declared.group, declared.resource, declared.verb)}, name
        for resource in (
            "rlhf.dev/v1alpha1/rlhfjobs",
            "ray.io/v1/rayclusters",
            "ray.io/v1/rayjobs",
        ):
            for (res, ns, obj), _ in list(api.objects.items()):
                if res == kmock.resource(resource):
                    del api.objects[res, ns, obj]


def test_permissions_cover_the_operator_and_kopf() -> None:
    rules = kube.permissions()
    assert rules[("rlhf.dev", "rlhfjobs/status")] == ["patch"]
    assert {"list", "watch", "patch", "delete"} <= set(rules[("rlhf.dev", "rlhfjobs")])
    assert {"create", "delete", "list", "watch"} <= set(rules[("ray.io", "rayjobs")])
    assert rules[("", "events")] == ["create", "list"]  # kopf posts; the operator reads pods'
    assert rules[("", "pods")] == ["list"]
    assert all(verbs == sorted(set(verbs)) for verbs in rules.values())
