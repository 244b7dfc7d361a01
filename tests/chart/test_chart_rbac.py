"""The chart grants exactly what the code uses: every API call, and nothing beyond.

Operator: the (Cluster)Role is compared with `rlhf_operator.kube.permissions()` — the registry of
every request the operator's code makes (`@api_call`) plus what kopf does for it
(`FRAMEWORK_PERMISSIONS`). That registry is only complete if no other operator module calls the
API, and kopf's share only if it covers the handlers kopf actually registered: both are checked
here from the code. Trainer: its Role is compared with the API calls found in rlhf_trainer's
source (progress reporting to rlhfjobprogresses/status).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
import rlhf_operator.handlers  # noqa: F401  (registers the operator's handlers with kopf)
from chart_helpers import RELEASE, REPO, Render, by_kind
from chart_helpers import RELEASE_NAMESPACE as RELEASE_NS
from kopf._cogs.structs.references import Resource, Selector
from rlhf_operator import kube, names
from rlhf_operator.api import GROUP, KIND, PLURAL, SINGULAR, VERSION
from rlhf_operator.api.progress import PROGRESS_KIND, PROGRESS_PLURAL, PROGRESS_SINGULAR

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)

# What `permissions()` lists but a given install mode does not grant, and why. Nothing else may
# be missing, and nothing may be granted beyond permissions().
NOT_GRANTED_CLUSTERWIDE: dict[Grant, str] = {
    grant: "kopf lists/watches namespaces only to resolve namespace patterns; with every "
    "namespace served (no --namespace) it never does (kopf/_core/reactor/observation.py, "
    "namespace_observer: clusterwide)"
    for grant in (("", "namespaces", "list"), ("", "namespaces", "watch"))
}
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): "kopf's CRD scanning: a Role cannot "
    "grant it; kopf then scans resources once at start-up (API discovery needs no RBAC)",
    ("", "namespaces"): "kopf's namespace observation: a Role cannot grant it; kopf then takes "
    "the --namespace value as the namespace (what a single-namespace install wants)",
}
# Kubernetes client methods: <verb>_namespaced_<kind>, <verb>_cluster_custom_object, ...
CLIENT_METHOD = re.compile(
    r"^(create|delete|patch|replace|read|list|get|watch)_"
    r"(namespaced_\w+|cluster_custom_object\w*|custom_resource_definition\w*|namespace\w*)$"
)
RBAC_VERB = {"read": "get", "get": "get", "list": "list", "watch": "watch", "create": "create",
             "patch": "patch", "replace": "update", "delete": "delete"}  # fmt: skip


def expected_operator_grants() -> set[Grant]:
    return {
        (group, resource, verb)
        for (group, resource), verbs in kube.permissions().items()
        for verb in verbs
    }


def granted(role: dict[str, Any]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            f"{role['metadata']['name']}: rule {rule} uses resourceNames/nonResourceURLs"
        )
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def operator_role(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    name = f"{RELEASE}-rlhf-operator"
    (role,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return role


# --------------------------------------------------------------------------- operator


def test_cluster_role_grants_exactly_what_the_operator_uses(render: Render) -> None:
    grants = granted(operator_role(render(), "ClusterRole"))
    expected = expected_operator_grants()
    assert not grants - expected, f"granted but never used: {sorted(grants - expected)}"
    missing = expected - grants
    assert missing == set(NOT_GRANTED_CLUSTERWIDE) & expected, (
        f"used but not granted: {sorted(missing - set(NOT_GRANTED_CLUSTERWIDE))}"
    )


def test_namespaced_role_grants_what_a_role_can(render: Render) -> None:
    docs = render("watchNamespace=team-a")
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    grants = granted(operator_role(docs, "Role"))
    expected = {g for g in expected_operator_grants() if g[:2] not in CLUSTER_SCOPED}
    assert grants == expected, (
        f"granted but unused: {sorted(grants - expected)}; used but missing: "
        f"{sorted(expected - grants)}"
    )


def test_operator_itself_needs_nothing_cluster_scoped() -> None:
    """A single-namespace install must work: only kopf's optional scanning is cluster-scoped."""
    own = {(call.group, call.resource) for call in kube.API_CALLS.values()}
    assert not own & set(CLUSTER_SCOPED)


def test_leader_election_role_grants_exactly_the_lease_calls(render: Render) -> None:
    """The Lease is in the release namespace whatever the operator serves: its own Role."""
    for sets in ((), ("watchNamespace=team-a",)):
        docs = render(*sets)
        name = f"{RELEASE}-rlhf-operator-leader-election"
        (role,) = [d for d in by_kind(docs, "Role") if d["metadata"]["name"] == name]
        (binding,) = [d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == name]
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == RELEASE_NS
        expected = {(g, r, v) for (g, r), verbs in kube.lease_permissions().items() for v in verbs}
        assert (
            granted(role)
            == expected
            == {("coordination.k8s.io", "leases", verb) for verb in ("create", "get", "patch")}
        )
        assert binding["roleRef"]["name"] == name


def test_no_secrets_no_wildcards(render: Render) -> None:
    for sets in ((), ("watchNamespace=team-a",)):
        for doc in render(*sets):
            if doc["kind"] in {"ClusterRole", "Role"}:
                assert not any(g[1].startswith("secrets") for g in granted(doc)), doc


def _client_calls(package: Path) -> list[tuple[Path, ast.Call, str]]:
    """Every Kubernetes-client-shaped method call in a package's source."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and CLIENT_METHOD.match(node.func.attr)
            ):
                found.append((path, node, node.func.attr))
    return found


def test_operator_calls_the_api_only_through_the_registry() -> None:
    """permissions() is complete only if kube.py is the one module that calls the API (the
    kubectl plugin runs with the user's credentials, not the operator's, and is exempt)."""
    package = REPO / "operator" / "rlhf_operator"
    outside = [
        f"{path.relative_to(REPO)}:{call.lineno} {name}"
        for path, call, name in _client_calls(package)
        if path.name != "kube.py" and "plugin" not in path.relative_to(package).parts
    ]
    assert not outside, f"API calls outside rlhf_operator/kube.py (not in the registry): {outside}"
    registered = {fn for fn in kube.API_CALLS}
    assert registered, "rlhf_operator.kube registered no API calls"


# The resources the operator's handlers can match, as kopf resolves them from API discovery.
KNOWN_RESOURCES = (
    Resource(GROUP, VERSION, PLURAL, kind=KIND, singular=SINGULAR, namespaced=True),
    Resource(GROUP, VERSION, PROGRESS_PLURAL, kind=PROGRESS_KIND, singular=PROGRESS_SINGULAR,
             namespaced=True),
    Resource(names.RAY_GROUP, names.RAY_VERSION, names.RAYCLUSTERS, kind=names.RAYCLUSTER_KIND,
             singular="raycluster", namespaced=True),
    Resource(names.RAY_GROUP, names.RAY_VERSION, names.RAYJOBS, kind=names.RAYJOB_KIND,
             singular="rayjob", namespaced=True),
)  # fmt: skip


def _served(selector: Selector) -> tuple[str, str]:
    """(group, plural) of the one known resource a kopf handler's selector matches."""
    (resource,) = [r for r in KNOWN_RESOURCES if selector.check(r)] or [None]
    assert resource is not None, f"a kopf handler serves {selector}, unknown to this test"
    return resource.group, resource.plural


def test_framework_permissions_cover_kopfs_handlers() -> None:
    """What kopf does for the handlers it registered — watch every resource it serves; patch
    (progress, diff-base, finalizer) those with change handlers, timers or daemons — is in
    FRAMEWORK_PERMISSIONS."""
    registry = kopf.get_default_registry()
    needed: set[Grant] = set()
    watching = [
        *registry._indexing.get_all_handlers(),
        *registry._watching.get_all_handlers(),
    ]
    patching = [
        *registry._changing.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
    ]
    for handler in [*watching, *patching]:
        group, plural = _served(handler.selector)
        needed |= {(group, plural, "list"), (group, plural, "watch")}
        if handler in patching:
            needed.add((group, plural, "patch"))
    assert (GROUP, PLURAL, "watch") in needed, "no kopf handler on RLHFJobs was found"
    framework = {(c.group, c.resource, c.verb) for c in kube.FRAMEWORK_PERMISSIONS}
    assert needed <= framework, f"kopf needs {sorted(needed - framework)}"


# --------------------------------------------------------------------------- trainer


def trainer_api_calls() -> set[Grant]:
    """(group, resource, verb) of every API call in rlhf_trainer, derived from its source."""
    grants = set()
    for path, call, name in _client_calls(REPO / "trainer_image" / "rlhf_trainer"):
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        match = re.match(r"^(\w+?)_namespaced_custom_object(_status)?$", name)
        assert match, f"{where}: {name} is not a custom-object call; extend the trainer Role"
        names = {arg.id for arg in call.args if isinstance(arg, ast.Name)}
        assert "GROUP" in names, f"{where}: {name} outside the rlhf.dev group"
        plural = PROGRESS_PLURAL if "PROGRESS_PLURAL" in names else PLURAL
        assert {"PLURAL", "PROGRESS_PLURAL"} & names, f"{where}: {name} on an unknown resource"
        resource = f"{plural}/status" if match.group(2) else plural
        grants.add((GROUP, resource, RBAC_VERB[match.group(1)]))
    return grants


def test_trainer_role_grants_exactly_what_progress_reporting_uses(render: Render) -> None:
    used = trainer_api_calls()
    # The progress merge-patch, on the trainer's own object, and nothing on RLHFJobs: their
    # status drives the operator (the trainer cannot steer it).
    assert used == {(GROUP, f"{PROGRESS_PLURAL}/status", "patch")}
    for sets in ((), ("watchNamespace=team-a",), ("trainer.namespaces={a,b}",)):
        roles = [
            d for d in by_kind(render(*sets), "Role") if d["metadata"]["name"].endswith("-trainer")
        ]
        assert roles
        for role in roles:
            assert granted(role) == used, f"{role['metadata']['namespace']}: {granted(role)}"


@pytest.mark.parametrize("kind", ["ClusterRole", "ClusterRoleBinding"])
def test_trainer_gets_nothing_cluster_wide(render: Render, kind: str) -> None:
    for doc in by_kind(render(), kind):
        assert "trainer" not in doc["metadata"]["name"]


# --------------------------------------------------------------------------- admission


def _blocking_owner_kinds() -> set[str]:
    """Owner kinds named with blockOwnerDeletion=true by the children the operator makes
    (RayCluster, stage RayJob, a warm-pool claim's ownerReferences)."""
    sys.path.insert(0, str(REPO / "tests" / "operator"))
    from kube_sim import sample_job
    from rlhf_operator import builders, warmpool
    from rlhf_operator.api import RLHFJob

    job = RLHFJob.model_validate(sample_job())
    meta = {"name": job.metadata.name, "namespace": "team-a", "uid": "u-1"}
    owner = builders.owner_reference(meta)
    children = [
        builders.build_raycluster(job, "c", owner)["metadata"],
        builders.build_stage_rayjob(job, "sft", 1, "c", owner)["metadata"],
        warmpool.claim_patch("1", meta)["metadata"],
    ]
    return {
        ref["kind"]
        for child in children
        for ref in child["ownerReferences"]
        if ref.get("blockOwnerDeletion")
    }


@pytest.mark.parametrize("sets", [(), ("watchNamespace=team-a",)], ids=["cluster", "namespace"])
def test_owner_references_permission_enforcement_admits_every_child(
    render: Render, sets: tuple[str, ...]
) -> None:
    """The admission rule itself (kubernetes plugin/pkg/admission/gc): setting
    blockOwnerDeletion=true on a reference to an owner of kind K needs `update` on
    K's `finalizers` subresource. Checked from the manifests the builders make."""
    plural_of = {KIND: PLURAL}  # every owner kind the operator may name, resolved to its plural
    kinds = _blocking_owner_kinds()
    assert kinds, "the children set blockOwnerDeletion (else this test checks nothing)"
    docs = render(*sets)
    grants = granted(operator_role(docs, "Role" if sets else "ClusterRole"))
    for kind in kinds:
        assert (GROUP, f"{plural_of[kind]}/finalizers", "update") in grants, kind
