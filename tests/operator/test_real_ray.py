"""The cluster path for real: the operator's RayJobs run on a local Ray through its job API.

What unit tests cannot see: the entrypoint's quoting, the runtime env, pvc:// paths inside the
"pods", the trainer's progress reaching the RLHFJob through the status sink.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from kube_sim import JOBS, OperatorRunner, create_job, eventually
from ray_kuberay import RealKubeRay

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from tiny_jobs import load_make_tiny, tiny_manifest

pytestmark = pytest.mark.slow
CLAIM = "e2e-claim"


async def test_the_tiny_job_runs_every_stage_on_real_ray(api, ray_session, tmp_path) -> None:
    started = time.monotonic()
    claim = Path(os.environ["RLHF_PVC_MOUNT_ROOT"]) / CLAIM
    shutil.rmtree(claim, ignore_errors=True)
    load_make_tiny().main(["--out", str(claim / "tiny")])
    manifest = tiny_manifest(claim / "tiny", Path("unused"))
    spec = manifest["spec"]
    spec["storage"]["uri"] = f"pvc://{CLAIM}/runs"
    spec["model"]["base"] = f"pvc://{CLAIM}/tiny/model"
    for stage, key in (
        ("sft", "dataset"),
        ("reward", "dataset"),
        ("ppo", "prompts"),
        ("evaluation", "prompts"),
    ):
        uri = spec["stages"][stage][key]["uri"]
        spec["stages"][stage][key]["uri"] = f"pvc://{CLAIM}/tiny/{Path(uri).name}"
    manifest["metadata"] = {"name": "tiny-e2e", "namespace": "ns"}
    async with RealKubeRay(api, ray_session) as kuberay, OperatorRunner() as _:
        await create_job(api, manifest)

        def phase():
            job = api.get(JOBS, "ns", "tiny-e2e") or {}
            status = job.get("status") or {}
            if status.get("phase") == "Failed":
                logs = {n: kuberay.logs(n)[-3000:] for n in kuberay.submitted}
                raise AssertionError(f"job failed: {status}\n{logs}")
            return status if status.get("phase") == "Succeeded" else None

        status = await eventually(phase, timeout=1200, every=1.0)
    stages = status["stages"]
    assert set(kuberay.submitted) == {s["rayJob"] for s in stages.values()}
    for stage in ("sft", "reward", "ppo", "evaluation"):
        assert stages[stage]["state"] == "Succeeded", stages[stage]
        assert (claim / "runs" / "tiny-e2e" / stage).is_dir(), stage
    # the trainer's own reports (status sink), not the operator's: progress and metrics
    assert stages["sft"]["progress"]["percent"] == 100.0
    assert stages["sft"].get("metrics"), stages["sft"]
    print(f"real-Ray e2e wall time: {time.monotonic() - started:.0f} s")
