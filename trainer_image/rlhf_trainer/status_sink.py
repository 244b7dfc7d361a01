"""The progress sink that writes a stage's progress into its job's RLHFJobProgress.

Used by `ProgressReporter.from_env` when RLHF_JOB_NAME/RLHF_JOB_NAMESPACE are set (every Ray pod
the operator creates). The operator creates `rlhfjobprogresses/<job>` and mirrors its progress
fields into the RLHFJob's status; the trainer may write nothing else (api/progress.py says why).
Talks to the API server with the official `kubernetes` client, imported lazily so local runs
never load it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from rlhf_operator.api import GROUP, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL
from rlhf_operator.api.status import HISTORY_METRICS, HistoryPoint, Progress, append_history

from rlhf_trainer.progress import ProgressReport, finite_metrics, redact

logger = logging.getLogger(__name__)

# A hung API server must not stall a training step for long: (connect, read) seconds.
K8S_REQUEST_TIMEOUT_S = (5.0, 10.0)
MERGE_PATCH = "application/merge-patch+json"


class KubernetesStatusSink:
    """JSON-merge-patches the stage's progress into `rlhfjobprogresses/<name>/status`.

    Writes `status.stages.<stage>.{progress, metrics, history}` through the status subresource
    (all the trainer's namespaced Role lets it write); the operator turns them into the RLHFJob's
    status and its PROGRESS/REWARD columns. The API client comes from the pod's ServiceAccount
    (in-cluster config), falling back to a kubeconfig for runs outside a pod.
    """

    min_interval_s: float | None = None  # the reporter's interval (30 s): the API is shared

    def __init__(
        self,
        name: str,
        namespace: str,
        stage: str,
        *,
        api_client: Any = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.stage = stage
        self._api_client = api_client
        self._owns_client = api_client is None
        self._api: Any = None
        self._history: list[HistoryPoint] = []

    def report(self, report: ProgressReport) -> None:
        api = self._custom_objects_api()
        api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PROGRESS_PLURAL,
            self.name,
            self.status_patch(report),
            _content_type=MERGE_PATCH,
            _request_timeout=K8S_REQUEST_TIMEOUT_S,
        )

    def status_patch(self, report: ProgressReport) -> dict[str, Any]:
        """The merge-patch body for `report` (appends to the in-memory history first)."""
        metrics = finite_metrics(report.latest_metrics)
        tracked = {k: metrics[k] for k in HISTORY_METRICS.get(self.stage, ()) if k in metrics}
        if tracked:
            self._history = append_history(
                self._history, HistoryPoint(step=report.step, metrics=tracked)
            )
        progress = Progress(
            percent=min(max(report.percent, 0.0), 100.0),
            step=max(report.step, 0),
            total_steps=max(report.total_steps, 0),
            eta_seconds=None if report.eta_seconds is None else max(report.eta_seconds, 0.0),
        )
        stage_status: dict[str, Any] = {"progress": progress.to_wire(), "metrics": metrics}
        if self._history:
            # Merge patch replaces lists wholesale: always send the whole curve.
            stage_status["history"] = [point.to_wire() for point in self._history]
        return {"status": {"stages": {self.stage: stage_status}}}

    def describe_failure(self, exc: BaseException) -> str:
        """One actionable line for the log, without credentials or response headers."""
        job = f"RLHFJobProgress {self.namespace}/{self.name}"
        prefix = "progress reporting disabled"
        status = getattr(exc, "status", None)
        if status == 403:
            return (
                f"{prefix}: the trainer's ServiceAccount lacks patch on "
                f"{PROGRESS_PLURAL}/status in namespace {self.namespace} (403 Forbidden); grant "
                f"it with the chart's trainer Role"
            )
        if status == 401:
            return f"{prefix}: the API server rejected the trainer's credentials (401)"
        if status == 404:
            return (
                f"{prefix}: {job} not found (404); the operator creates it when a stage starts "
                f"(was the RLHFJob deleted, or is the operator older than this trainer image?)"
            )
        if status is not None:
            detail = _status_message(getattr(exc, "body", None))
            reason = getattr(exc, "reason", "") or ""
            return f"{prefix}: {job} status patch failed ({status} {reason}){detail}"
        if type(exc).__name__ == "ConfigException":
            return (
                f"{prefix}: no Kubernetes credentials (not in a pod with a ServiceAccount "
                f"and no kubeconfig)"
            )
        return f"{prefix}: {type(exc).__name__}: {redact(str(exc))[:300]}"

    def close(self) -> None:
        if self._owns_client and self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()

    def _custom_objects_api(self) -> Any:
        if self._api is None:
            from kubernetes import client  # lazy: only pods that report pay for it

            if self._api_client is None:
                self._api_client = default_api_client()
            self._api = client.CustomObjectsApi(self._api_client)
        return self._api


def default_api_client() -> Any:
    """An API client from the pod's ServiceAccount, else from the kubeconfig (KUBECONFIG)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # KUBECONFIG read now, not when `kubernetes` was imported (its default is frozen then).
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    configuration.retries = 1  # reporting is best effort: fail fast rather than stall a step
    return client.ApiClient(configuration)


def _status_message(body: Any) -> str:
    """The `message` of a Kubernetes Status body (our own payload's validation error)."""
    try:
        message = json.loads(body).get("message") if body else None
    except (TypeError, ValueError, AttributeError):
        return ""
    return f": {redact(str(message))[:300]}" if message else ""
