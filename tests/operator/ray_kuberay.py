"""A test KubeRay that runs RayJobs for real: on the session's local Ray, through its job API.

For a RayCluster it marks the cluster ready (the session's one local Ray stands in for its head,
as `ray_session` starts it: dashboard on, auth disabled, see tests/conftest.py). For each RayJob
it does what KubeRay's K8sJobMode submitter does (`ray job submit --address http://head:8265
--runtime-env-json <runtimeEnvYAML as JSON> --submission-id <jobId> -- <entrypoint>`) and
mirrors the Ray job's status into the RayJob's, as rayjob_controller.go does:
jobDeploymentStatus Initializing -> Running -> Complete | Failed, jobStatus = Ray's status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import yaml
from kube_sim import (
    CLUSTER_READY,
    MERGE_PATCH,
    RAYCLUSTERS,
    RAYJOBS,
    RLHFEmulator,
    TickingController,
)
from rlhf_operator import names


class RealKubeRay(TickingController):
    def __init__(self, api: RLHFEmulator, address: str, *, tick: float = 0.5) -> None:
        from ray.job_submission import JobSubmissionClient

        self.api, self.tick = api, tick
        self.client = JobSubmissionClient(address if "://" in address else f"http://{address}")
        self.submitted: dict[str, str] = {}  # RayJob name -> Ray submission id

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        for job_id in self.submitted.values():  # never leave a stage running into a later test
            with contextlib.suppress(Exception):
                self.client.stop_job(job_id)

    async def step(self) -> None:
        ready = set()
        for cluster in self.api.live(RAYCLUSTERS):
            meta = cluster["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            if (cluster.get("status") or {}).get("state") != "ready":
                await self._status(RAYCLUSTERS, cluster, CLUSTER_READY)
            ready.add((meta["namespace"], meta["name"]))
        for rayjob in self.api.live(RAYJOBS):
            meta, status = rayjob["metadata"], rayjob.get("status") or {}
            if meta.get("deletionTimestamp"):
                continue
            target = rayjob["spec"].get("clusterSelector", {}).get(names.LABEL_RAY_CLUSTER)
            if status.get("jobDeploymentStatus") in ("Complete", "Failed"):
                continue
            if (meta["namespace"], target) not in ready:
                if not status:
                    await self._status(RAYJOBS, rayjob, {"jobDeploymentStatus": "Initializing"})
                continue
            name = meta["name"]
            if name not in self.submitted:
                await self._status(
                    RAYJOBS,
                    rayjob,
                    {
                        "jobDeploymentStatus": "Initializing",
                        "rayClusterName": target,
                        "jobId": name,
                    },
                )
                self.submitted[name] = await asyncio.to_thread(self._submit, rayjob)
            await self._mirror(rayjob, target)

    def _submit(self, rayjob: dict[str, Any]) -> str:
        spec = rayjob["spec"]
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or None
        return self.client.submit_job(
            entrypoint=spec["entrypoint"],
            runtime_env=runtime_env,
            submission_id=rayjob["metadata"]["name"],
        )

    async def _mirror(self, rayjob: dict[str, Any], target: str) -> None:
        info = await asyncio.to_thread(
            self.client.get_job_info, self.submitted[rayjob["metadata"]["name"]]
        )
        job_status = str(info.status.value if hasattr(info.status, "value") else info.status)
        deployment = {"SUCCEEDED": "Complete", "FAILED": "Failed", "STOPPED": "Failed"}.get(
            job_status, "Running"
        )
        wanted: dict[str, Any] = {
            "jobDeploymentStatus": deployment,
            "jobStatus": job_status,
            "rayClusterName": target,
            "jobId": info.submission_id,
        }
        if deployment == "Failed":
            wanted |= {"reason": "AppFailed", "message": info.message or ""}
        if any((rayjob.get("status") or {}).get(k) != v for k, v in wanted.items()):
            await self._status(RAYJOBS, rayjob, wanted)

    async def _status(self, resource: str, obj: dict[str, Any], status: dict) -> None:
        meta = obj["metadata"]
        group, plural = resource.rsplit("/", 1)
        url = f"/apis/{group}/namespaces/{meta['namespace']}/{plural}/{meta['name']}/status"
        async with self.api.patch(url, json={"status": status}, headers=MERGE_PATCH) as resp:
            await resp.read()

    def logs(self, name: str) -> str:
        return self.client.get_job_logs(self.submitted[name])
