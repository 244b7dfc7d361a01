"""Pure: what is probably wrong with a job, and what to change — from the objects around it.

Inputs are wire dicts as the API returns them: the RLHFJob, the pods of its Ray cluster
(label `ray.io/cluster`) and the RayJobs of its stage attempts. Each hint names the field or the
command that fixes it. Order: the most blocking first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rlhf_operator import names
from rlhf_operator.plugin.fmt import duration
from rlhf_operator.plugin.summary import seconds_between, stage_failures

Obj = Mapping[str, Any]
Hint = dict[str, str]

GPU_RESOURCE = "nvidia.com/gpu"
NO_PROGRESS_AFTER_S = 600.0
CLUSTER_SLOW_AFTER_S = 900.0
NO_STATUS_AFTER_S = 60.0
RESUME_PATCH = '{"spec":{"runPolicy":{"suspend":false}}}'
BATCH_FIELDS = {
    "sft": "microBatchSize",
    "reward": "microBatchSize",
    "ppo": "miniBatchSize",
    "dpo": "microBatchSize",
}
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
_OOM = re.compile(r"out of memory|OutOfMemoryError|OOMKilled", re.IGNORECASE)
_WRAPPER = re.compile(r"^RayJob \S+: (Ray job \w+|deployment \w+) \(")
_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?", re.IGNORECASE)


def hint(severity: str, reason: str, message: str) -> Hint:
    """A hint: severity error (the job cannot go on), warning (likely trouble) or info."""
    return {"severity": severity, "reason": reason, "message": message}


def job_hints(
    job: Obj, pods: Sequence[Obj] = (), rayjobs: Sequence[Obj] = (), *, now: datetime
) -> list[Hint]:
    """Every hint for `job`, most blocking first."""
    pod_hints = _pod_hints(job, pods)
    progress = _progress_hints(job, now)
    if pod_hints:  # the pods already say why the cluster is slow
        progress = [h for h in progress if h["reason"] != "ClusterSlow"]
    out = [*_status_hints(job, now), *pod_hints, *_failure_hints(job, rayjobs), *progress]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda h: order.get(h["severity"], 3))


# ---------------------------------------------------------------------------- the job itself


def _status_hints(job: Obj, now: datetime) -> list[Hint]:
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    name = meta.get("name", "JOB")
    age = seconds_between(meta.get("creationTimestamp"), None, now) or 0.0
    out: list[Hint] = []
    if not status.get("phase") and age > NO_STATUS_AFTER_S:
        out.append(
            hint(
                "warning",
                "NoStatus",
                f"The job has no status after {duration(age)}: no operator has processed it. "
                "Check that the rlhf-operator Deployment runs and watches this namespace.",
            )
        )
    for cond in status.get("conditions") or []:
        if cond.get("type") == names.COND_VALID and cond.get("status") == "False":
            out.append(
                hint(
                    "error",
                    "InvalidSpec",
                    f"The spec is invalid: {cond.get('message') or cond.get('reason')}. Fix that "
                    f"field in the manifest and apply it again (kubectl apply -f ...).",
                )
            )
    policy = spec.get("runPolicy") or {}
    deadline = policy.get("activeDeadlineSeconds")
    deadline_reason = any(
        c.get("reason") == names.DEADLINE_EXCEEDED for c in status.get("conditions") or []
    )
    started = status.get("startTime") or meta.get("creationTimestamp")
    elapsed = seconds_between(started, status.get("completionTime"), now)
    if deadline_reason or (deadline and elapsed is not None and elapsed > deadline):
        limit = f"{deadline} s" if deadline else "its limit"
        out.append(
            hint(
                "error",
                "DeadlineExceeded",
                f"The job ran longer than spec.runPolicy.activeDeadlineSeconds ({limit}). "
                "Raise it (or remove it) if the run needs longer.",
            )
        )
    if status.get("phase") == "Suspended" or policy.get("suspend"):
        out.append(
            hint(
                "info",
                "Suspended",
                "The job is suspended (spec.runPolicy.suspend: true). Resume it with: "
                f"kubectl patch rlhfjob {name} --type merge -p '{RESUME_PATCH}'",
            )
        )
    return out


# ---------------------------------------------------------------------------- the Ray pods


def _pod_hints(job: Obj, pods: Sequence[Obj]) -> list[Hint]:
    workers = ((job.get("spec") or {}).get("cluster") or {}).get("workers") or {}
    gpus = workers.get("gpusPerWorker") or 0
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for pod in pods:
        pod_name = (pod.get("metadata") or {}).get("name", "?")
        pstatus = pod.get("status") or {}
        for cond in pstatus.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                message = cond.get("message") or cond.get("reason") or "unschedulable"
                if f"Insufficient {GPU_RESOURCE}" in message:
                    kind = "gpu"
                elif "Insufficient" in message:
                    kind = "resources"
                elif "affinity" in message or "selector" in message or "taint" in message:
                    kind = "nodes"
                else:
                    kind = "unschedulable"
                by_kind.setdefault(kind, []).append((pod_name, message))
        for cs in pstatus.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in IMAGE_PULL_REASONS:
                by_kind.setdefault("image", []).append((pod_name, waiting.get("message") or ""))
            elif last.get("reason") == "OOMKilled":
                by_kind.setdefault("oomkilled", []).append((pod_name, cs.get("name", "")))
            elif waiting.get("reason") == "CrashLoopBackOff":
                by_kind.setdefault("crashloop", []).append((pod_name, cs.get("name", "")))

    out: list[Hint] = []
    if "gpu" in by_kind:
        names, message = _names(by_kind["gpu"]), by_kind["gpu"][0][1]
        out.append(
            hint(
                "error",
                "InsufficientGPU",
                f"Ray pod(s) {names} cannot be scheduled: {message} Each worker asks for {gpus} "
                f"{GPU_RESOURCE} (spec.cluster.workers.gpusPerWorker). Add GPU nodes (or let the "
                "cluster autoscaler add them), lower gpusPerWorker or replicas, or check that "
                "nodeSelector/tolerations match your GPU node pool.",
            )
        )
    if "resources" in by_kind:
        names, message = _names(by_kind["resources"]), by_kind["resources"][0][1]
        out.append(
            hint(
                "error",
                "InsufficientResources",
                f"Ray pod(s) {names} cannot be scheduled: {message} Lower "
                "spec.cluster.workers.resources / spec.cluster.head.resources, or add nodes.",
            )
        )
    if "nodes" in by_kind:
        names, message = _names(by_kind["nodes"]), by_kind["nodes"][0][1]
        out.append(
            hint(
                "error",
                "NoMatchingNode",
                f"Ray pod(s) {names} match no node: {message} Check "
                "spec.cluster.workers.nodeSelector, tolerations and affinity.",
            )
        )
    if "unschedulable" in by_kind:
        names, message = _names(by_kind["unschedulable"]), by_kind["unschedulable"][0][1]
        out.append(hint("warning", "Unschedulable", f"Ray pod(s) {names} pending: {message}"))
    if "image" in by_kind:
        names, message = _names(by_kind["image"]), by_kind["image"][0][1]
        out.append(
            hint(
                "error",
                "ImagePull",
                f"Ray pod(s) {names} cannot pull the trainer image: {message} Check "
                "spec.cluster.image and the registry's pull secret.",
            )
        )
    if "oomkilled" in by_kind:
        out.append(
            hint(
                "warning",
                "OOMKilled",
                f"Ray pod(s) {_names(by_kind['oomkilled'])} were killed for memory. Raise "
                "spec.cluster.workers.resources.limits.memory, or shard more: "
                "spec.parallelism.zeroStage: 3, offload: optimizer.",
            )
        )
    if "crashloop" in by_kind:
        out.append(
            hint(
                "warning",
                "CrashLoop",
                f"Ray pod(s) {_names(by_kind['crashloop'])} keep crashing: kubectl logs "
                f"{by_kind['crashloop'][0][0]} --previous",
            )
        )
    return out


def _names(items: list[tuple[str, str]], most: int = 3) -> str:
    names = [name for name, _ in items]
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# ---------------------------------------------------------------------------- stage failures


def _same_error(line: str) -> str:
    """A failure line with the operator's "RayJob <name>: ... (" wrapper, closing punctuation
    and numbers masked: two OOMs of two attempts at different sizes are one error."""
    return _NUMBERS.sub("N", _WRAPPER.sub("", line).rstrip(").… "))


def _failure_hints(job: Obj, rayjobs: Sequence[Obj]) -> list[Hint]:
    name = (job.get("metadata") or {}).get("name", "JOB")
    out: list[Hint] = []
    for stage, lines in stage_failures(job, rayjobs).items():
        counts: dict[str, int] = {}
        for line in lines:
            counts[_same_error(line)] = counts.get(_same_error(line), 0) + 1
        repeated = [line for line in lines if counts[_same_error(line)] >= 2]
        if repeated:
            n = counts[_same_error(repeated[-1])]
            out.append(
                hint(
                    "error",
                    "SameErrorRepeated",
                    f"Stage {stage} failed {n} times with the same error: {repeated[-1]} — "
                    "retrying will not fix it; change the spec or the data. Full log: "
                    f"kubectl rlhf logs {name} --stage {stage}",
                )
            )
        if any(_OOM.search(line) for line in lines):
            out.append(
                hint(
                    "warning",
                    "OutOfMemory",
                    f"Stage {stage} ran out of memory. {_smaller_batch(stage)}Enable "
                    "spec.parallelism.gradientCheckpointing, or shard more "
                    "(spec.parallelism.zeroStage: 3, offload: optimizer).",
                )
            )
    return out


def _smaller_batch(stage: str) -> str:
    field = BATCH_FIELDS.get(stage)
    return f"Lower spec.stages.{stage}.{field}. " if field else ""


# ---------------------------------------------------------------------------- progress


def _progress_hints(job: Obj, now: datetime) -> list[Hint]:
    status = job.get("status") or {}
    out: list[Hint] = []
    name = (job.get("metadata") or {}).get("name", "JOB")
    for stage, st in (status.get("stages") or {}).items():
        running = seconds_between(st.get("startTime"), None, now)
        stalled = running is not None and running > NO_PROGRESS_AFTER_S
        if st.get("state") == "Running" and not st.get("progress") and stalled:
            out.append(
                hint(
                    "warning",
                    "NoProgress",
                    f"Stage {stage} has run {duration(running)} without a progress report. The "
                    "trainer may lack permission to patch rlhfjobprogresses/status (its "
                    "ServiceAccount: spec.cluster.serviceAccountName), or is still loading: "
                    f"kubectl rlhf logs {name} --stage {stage}",
                )
            )
    if status.get("phase") == "Provisioning":
        cluster = (status.get("cluster") or {}).get("name") or "the RayCluster"
        started = status.get("startTime") or (job.get("metadata") or {}).get("creationTimestamp")
        waiting = seconds_between(started, None, now)
        if waiting is not None and waiting > CLUSTER_SLOW_AFTER_S:
            out.append(
                hint(
                    "warning",
                    "ClusterSlow",
                    f"The Ray cluster is not ready after {duration(waiting)}: kubectl describe "
                    f"raycluster {cluster}",
                )
            )
    return out
