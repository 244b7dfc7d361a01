"""The Helm chart: lint, render, Kubernetes schemas, the CRD it installs, and what it runs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_helpers import CHART, RELEASE, RELEASE_NAMESPACE, REPO, Render, by_kind, one, run_helm
from rlhf_operator.__main__ import parse_args
from rlhf_operator.builders import TRAINER_SERVICE_ACCOUNT
from rlhf_operator.crd import (
    CHART_CRD_FILE,
    CHART_PROGRESS_CRD_FILE,
    CRD_FILE,
    PROGRESS_CRD_FILE,
    render_crd,
    render_progress_crd,
)

# Each CRD the chart installs: (its file in crds/, its copy in the chart, what generates it)
CRDS = [
    (CRD_FILE, CHART_CRD_FILE, render_crd),
    (PROGRESS_CRD_FILE, CHART_PROGRESS_CRD_FILE, render_progress_crd),
]

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

FULL = (
    "metrics.service.enabled=true",
    "metrics.serviceMonitor.enabled=true",
    "metrics.serviceMonitor.labels.release=prom",
    "operator.logLevel=debug",
    "trainer.namespaces={team-a,team-b}",
    "image.tag=0.2.0",
    "podAnnotations.example\\.com/owner=ml-platform",
)
NAMESPACED = ("watchNamespace=team-a",)
CONFIGS = {"default": (), "namespaced": NAMESPACED, "full": FULL}

CLUSTER_SCOPED_KINDS = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (operator,) = pod["containers"]
    return operator


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("sets", CONFIGS.values(), ids=CONFIGS.keys())
def test_helm_lint_passes_strict(helm: str, sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE]
    for item in sets:
        args += ["--set", item]
    done = run_helm(helm, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("config", CONFIGS)
def test_every_manifest_is_valid_kubernetes(render: Render, config: str, version: str) -> None:
    docs = render(*CONFIGS[config])
    without_schema = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.append(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{config}: {name} is invalid for Kubernetes {version}: {path}: {exc}")
    # Only the Prometheus Operator's ServiceMonitor is not a built-in kind (checked below).
    assert set(without_schema) <= {"ServiceMonitor"}


def test_service_monitor_scrapes_the_metrics_service(render: Render) -> None:
    docs = render(*FULL)
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [RELEASE_NAMESPACE]
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # ...and the Service reaches the operator's metrics port.
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in container(docs)["ports"]}


def test_metrics_objects_are_opt_in(render: Render) -> None:
    kinds = {doc["kind"] for doc in render()}
    assert "Service" not in kinds and "ServiceMonitor" not in kinds


# --------------------------------------------------------------------------- the CRD


def _crd(docs: list[dict[str, Any]], generated_file: Path) -> dict[str, Any]:
    name = yaml.safe_load(generated_file.read_text())["metadata"]["name"]
    (crd,) = [d for d in by_kind(docs, "CustomResourceDefinition") if d["metadata"]["name"] == name]
    return crd


@pytest.mark.parametrize(("crd_file", "chart_file", "generate"), CRDS)
def test_chart_crd_file_is_the_generated_crd(crd_file: Path, chart_file: Path, generate) -> None:
    assert chart_file.read_text() == crd_file.read_text(), (
        f"{chart_file.relative_to(REPO)} differs from {crd_file.relative_to(REPO)}: run "
        "`make crds` and commit both"
    )
    assert crd_file.read_text() == generate(), "crds/ is stale: run `make crds`"


@pytest.mark.parametrize("crd_file", [c[0] for c in CRDS])
def test_rendered_crd_is_the_generated_crd_plus_labels(render: Render, crd_file: Path) -> None:
    crd = _crd(render(), crd_file)
    generated = yaml.safe_load(crd_file.read_text())
    metadata = crd["metadata"]
    assert metadata.pop("labels")["app.kubernetes.io/instance"] == RELEASE
    # Kept on uninstall: deleting the CRD would delete every RLHFJob and, through owner
    # references, their RayClusters and RayJobs.
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crd == generated


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_crd_is_a_valid_crd(render: Render, version: str) -> None:
    crds = by_kind(render(), "CustomResourceDefinition")
    assert len(crds) == len(CRDS)
    for crd in crds:
        kubernetes_validate.validate(crd, version, strict=True)
        (served,) = crd["spec"]["versions"]
        assert served["subresources"] == {"status": {}}


def test_packaged_chart_still_carries_the_crd(helm: str, tmp_path: Path) -> None:
    """`helm package` (what a chart repository serves) keeps files/crds, so the CRD template
    renders from the .tgz as it does from the checkout."""
    done = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (package,) = tmp_path.glob("rlhf-operator-*.tgz")
    done = run_helm(helm, "template", RELEASE, str(package), "--show-only", "templates/crds.yaml")
    assert done.returncode == 0, done.stderr
    rendered = {d["metadata"]["name"] for d in yaml.safe_load_all(done.stdout) if d}
    assert rendered == {yaml.safe_load(f.read_text())["metadata"]["name"] for f, _, _ in CRDS}


def test_crds_can_be_left_to_someone_else(render: Render) -> None:
    assert not by_kind(render("crds.enabled=false"), "CustomResourceDefinition")
    for crd in by_kind(render("crds.keep=false"), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


# --------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("config", CONFIGS)
def test_operator_pod_meets_the_restricted_profile(render: Render, config: str) -> None:
    docs = render(*CONFIGS[config])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    ctr = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= ctr["resources"]["requests"].keys()
    assert "memory" in ctr["resources"]["limits"]
    assert not any(key.startswith("host") for key in pod)  # hostNetwork/PID/IPC


def test_two_replicas_one_active_rolled_without_a_gap(render: Render) -> None:
    """helm upgrade rolls: the new pod (a standby first) is up and ready before an old one
    stops, so there is always a replica that holds the Lease or can take it over."""
    spec = one(render(), "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    ctr = container(render())
    args = parse_args(ctr["args"])
    assert args.leader_election and args.lease_namespace == RELEASE_NAMESPACE
    assert args.lease_duration == 10
    pod_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {"name": "POD_NAME", "valueFrom": pod_name} in ctr["env"]


def test_an_upgrade_keeps_the_lease(render: Render) -> None:
    """Old and new pods of an upgrade contend for the same Lease (named after the release, not
    after anything an upgrade changes), so they never both act."""
    before = parse_args(container(render())["args"])
    after = parse_args(container(render("image.tag=9.9.9", "operator.logLevel=debug"))["args"])
    assert (before.lease_name, before.lease_namespace) == (after.lease_name, after.lease_namespace)
    assert before.lease_name == f"{RELEASE}-rlhf-operator"


def test_without_leader_election_one_replica_replaced_not_rolled(render: Render) -> None:
    docs = render("leaderElection.enabled=false", "replicaCount=3")
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 1  # two standalone operators would race
    assert spec["strategy"] == {"type": "Recreate"}
    assert not parse_args(container(docs)["args"]).leader_election
    assert not [d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-election")]


@pytest.mark.parametrize(
    ("sets", "namespaces"), [((), []), (NAMESPACED, ["team-a"])], ids=["all", "team-a"]
)
def test_operator_cli_accepts_the_chart_args(
    render: Render, sets: tuple[str, ...], namespaces: list[str]
) -> None:
    """The chart's args parse with the operator's own parser (an unknown flag would crash it)."""
    ctr = container(render(*sets))
    assert ctr["command"] == ["rlhf-operator"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'rlhf-operator = "rlhf_operator.__main__:main"' in pyproject
    args = parse_args(ctr["args"])
    assert args.namespace == namespaces
    assert args.debug is False and args.verbose is False


def test_probes_hit_the_health_endpoints(render: Render) -> None:
    """Liveness /healthz (leader and standby alike), readiness /readyz (reached the API)."""
    ctr = container(render("operator.healthPort=8181"))
    args = parse_args(ctr["args"])
    ports = {port["name"]: port["containerPort"] for port in ctr["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert ports["health"] == 8181
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_log_level_becomes_kopf_flags(render: Render) -> None:
    assert parse_args(container(render("operator.logLevel=debug"))["args"]).debug is True
    assert parse_args(container(render("operator.logLevel=verbose"))["args"]).verbose is True


def test_metrics_port_reaches_the_operator(render: Render) -> None:
    ctr = container(render("metrics.port=9100"))
    assert parse_args(ctr["args"]).metrics_port == 9100
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in ctr["ports"]


def test_image_defaults_to_the_chart_app_version(render: Render) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(render())["image"].endswith(f":{app_version}")
    assert container(render("image.tag=1.2.3"))["image"].endswith(":1.2.3")


# --------------------------------------------------------------------------- namespaces, trainer


def test_single_namespace_install_creates_nothing_cluster_wide(render: Render) -> None:
    docs = render("watchNamespace=team-a", "crds.enabled=false")
    assert not [d["kind"] for d in docs if d["kind"] in CLUSTER_SCOPED_KINDS]
    operator = f"{RELEASE}-rlhf-operator"
    (role,) = [d for d in by_kind(docs, "Role") if d["metadata"]["name"] == operator]
    (binding,) = [d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == operator]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": operator
    }  # fmt: skip
    # The operator's ServiceAccount stays in the release namespace.
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": operator, "namespace": RELEASE_NAMESPACE}
    ]


def _trainer_objects(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    trainer = [
        d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        == "trainer"
    ]  # fmt: skip
    out: dict[str, set[str]] = {}
    for doc in trainer:
        out.setdefault(doc["kind"], set()).add(doc["metadata"]["namespace"])
    return out


@pytest.mark.parametrize(
    ("sets", "namespaces"),
    [
        ((), {RELEASE_NAMESPACE}),
        (NAMESPACED, {"team-a"}),
        (("trainer.namespaces={team-a,team-b}",), {"team-a", "team-b"}),
    ],
    ids=["release-namespace", "watch-namespace", "listed"],
)
def test_trainer_identity_in_every_job_namespace(
    render: Render, sets: tuple[str, ...], namespaces: set[str]
) -> None:
    found = _trainer_objects(render(*sets))
    assert found == {"ServiceAccount": namespaces, "Role": namespaces, "RoleBinding": namespaces}


def test_trainer_service_account_is_the_one_the_operator_assigns(render: Render) -> None:
    docs = render(*NAMESPACED)
    accounts = {
        d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")
        if d["metadata"]["namespace"] == "team-a"
    }  # fmt: skip
    assert accounts == {TRAINER_SERVICE_ACCOUNT}
    for binding in by_kind(docs, "RoleBinding"):
        if binding["metadata"]["name"].endswith("-trainer"):
            assert binding["subjects"][0]["name"] == TRAINER_SERVICE_ACCOUNT
    no_sa = render("trainer.serviceAccount.create=false")
    assert TRAINER_SERVICE_ACCOUNT not in {d["metadata"]["name"] for d in no_sa}
    assert _trainer_objects(no_sa)["RoleBinding"] == {RELEASE_NAMESPACE}


# --------------------------------------------------------------------------- NOTES


def test_notes_explain_kuberay_submitting_and_watching(helm: str) -> None:
    done = run_helm(
        helm, "install", RELEASE, str(CHART), "--namespace", "team-a", "--dry-run=client"
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "helm install kuberay-operator kuberay/kuberay-operator" in notes
    assert "https://ray-project.github.io/kuberay-helm/" in notes
    assert "kubectl -n team-a apply -f examples/imdb-sentiment.yaml" in notes
    assert "get rlhfjobs -w" in notes
    for word in shlex.split(notes):
        if word.startswith("examples/"):
            assert (REPO / word).is_file(), f"NOTES point at a missing {word}"


def test_chart_files_have_no_stray_copies() -> None:
    """The chart's only CRD source is files/crds (written by `make crds`); helm's own crds/
    folder would install a second, never-upgraded copy."""
    assert not (CHART / "crds").exists()
    assert sorted(p.name for p in (CHART / "files" / "crds").iterdir()) == sorted(
        chart_file.name for _, chart_file, _ in CRDS
    )


def test_tenancy_settings_reach_the_operator(render: Render) -> None:
    """The chart's networkPolicy and warmPool values become the environment that
    rlhf_operator/tenancy.py reads (same names), and POD_NAMESPACE names the operator's own."""
    import inspect

    from rlhf_operator import tenancy

    docs = render("networkPolicy.rayClientNamespaces={kuberay,team-tools}")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["RLHF_RAY_CLIENT_NAMESPACES"]["value"] == "kuberay,team-tools"
    assert env["RLHF_NETWORK_POLICIES"]["value"] == "true"
    assert env["RLHF_MAX_POOLED_CLUSTERS"]["value"] == "4"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    source = inspect.getsource(tenancy)
    tenancy_env = [n for n in env if n.startswith("RLHF_") or n == "POD_NAMESPACE"]
    assert len(tenancy_env) == 4
    for name in tenancy_env:
        assert f'"{name}"' in source, f"tenancy.py does not read {name}"
