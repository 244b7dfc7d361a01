"""The running operator's /metrics move as a job runs (the real operator, emulated API, KubeRay).

The operator runs in this process, so it feeds `rlhf_operator.metrics.METRICS`; the test serves
that registry on an ephemeral port and scrapes it over HTTP like Prometheus. Other tests in the
same process feed the same registry, so every assertion is a difference between two scrapes.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest
from kube_sim import (
    FAIL,
    JOBS,
    RAYCLUSTERS,
    SUCCEED,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    create_jobs_while_down,
    delete_job,
    eventually,
    sample_job,
    stage_of,
)
from prometheus_client.parser import text_string_to_metric_families
from rlhf_operator import warmpool
from rlhf_operator.metrics import METRICS

NS = "ns"
FINISHED = "rlhf_operator_jobs_finished_total"
HITS, MISSES = "rlhf_operator_warm_pool_hits_total", "rlhf_operator_warm_pool_misses_total"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = METRICS.start_server(port=0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


async def scrape(url: str) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    text = await asyncio.to_thread(get)  # the operator shares this event loop: never block it
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_follow_a_job_with_a_retried_stage(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: object, endpoint: str
) -> None:
    # The reward stage's first attempt dies; its retry and every other stage succeed.
    kuberay.plan = lambda rayjob: FAIL if stage_of(rayjob) == ("reward", 1) else SUCCEED
    before = await scrape(endpoint)

    finished = {"phase": "Succeeded"}
    done_before = METRICS.registry.get_sample_value(FINISHED, finished) or 0.0

    await create_job(api, sample_job("watched", NS))
    # The status write lands first, then the operator observes it: wait for the observation.
    await eventually(
        lambda: METRICS.registry.get_sample_value(FINISHED, finished) == done_before + 1,
    )
    after = await scrape(endpoint)
    assert api.get(JOBS, NS, "watched")["status"]["phase"] == "Succeeded"

    assert moved(before, after, "rlhf_operator_jobs", phase="Succeeded") == 1
    assert moved(before, after, "rlhf_operator_jobs_finished_total", phase="Succeeded") == 1
    for stage in ("sft", "reward", "ppo", "evaluation"):
        labels = {"stage": stage, "state": "Succeeded"}
        assert moved(before, after, "rlhf_operator_stage_duration_seconds_count", **labels) == 1
    assert moved(before, after, "rlhf_operator_stage_retries_total", stage="reward") == 1
    assert moved(before, after, "rlhf_operator_stage_retries_total", stage="sft") == 0
    assert moved(before, after, "rlhf_operator_warm_pool_misses_total") == 1
    assert moved(before, after, "rlhf_operator_apply_to_first_rayjob_seconds_count") == 1

    # Deleting the job (its finalizer runs) takes it off the jobs-by-phase gauge.
    jobs_before = before.get(("rlhf_operator_jobs", (("phase", "Succeeded"),)), 0.0)
    await delete_job(api, NS, "watched")
    await eventually(
        lambda: METRICS.registry.get_sample_value("rlhf_operator_jobs", finished) == jobs_before,
    )


async def test_a_job_that_reuses_a_warm_cluster_is_a_hit(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    sft_only = {"reward": {"enabled": False}, "ppo": {"enabled": False},
                "evaluation": {"enabled": False}}  # fmt: skip
    warm = {"keepAliveSeconds": 300}

    def counts() -> tuple[float, float]:
        sample = METRICS.registry.get_sample_value
        return (sample(HITS) or 0.0, sample(MISSES) or 0.0)

    def succeeded(name: str) -> bool:
        return ((api.get(JOBS, NS, name) or {}).get("status") or {}).get("phase") == "Succeeded"

    def pooled(cluster: str) -> bool:
        labels = ((api.get(RAYCLUSTERS, NS, cluster) or {}).get("metadata") or {}).get("labels")
        return (labels or {}).get(warmpool.LABEL_STATE) == warmpool.STATE_AVAILABLE

    hits, misses = counts()
    await create_job(api, sample_job("first", NS, warmPool=warm, stages=sft_only))
    await eventually(lambda: succeeded("first"))
    await eventually(lambda: counts() == (hits, misses + 1))
    await eventually(lambda: pooled("first-ray"))  # released just after the status write

    # Applied while the operator is down: its first reconcile sees the pool (kube_sim).
    await create_jobs_while_down(
        api, operator, sample_job("second", NS, warmPool=warm, stages=sft_only)
    )
    await eventually(lambda: succeeded("second"))
    assert api.get(JOBS, NS, "second")["status"]["cluster"]["reused"] is True
    await eventually(lambda: counts() == (hits + 1, misses + 1))
