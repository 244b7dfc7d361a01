"""The operator's /metrics endpoint after a realistic sequence of status transitions.

Two jobs live through the operator: `a` creates its cluster, runs SFT, needs a second attempt of
the reward stage and succeeds; `b` claims `a`'s warm cluster and fails in PPO. Then a warm
cluster expires and a reconcile crashes. The test scrapes the real HTTP endpoint and reads what
a Prometheus server would.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from copy import deepcopy
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rlhf_operator.api.status import RLHFJobStatus
from rlhf_operator.metrics import OperatorMetrics

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
READY = {"type": "ClusterReady", "status": "True", "reason": "ClusterReady"}


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def body(name: str) -> dict:
    return {"metadata": {"name": name, "namespace": "ml", "creationTimestamp": at(0)}}


class Job:
    """Drives one job's status forward like the reconcile code would, observing every write."""

    def __init__(self, metrics: OperatorMetrics, name: str) -> None:
        self.metrics, self.body, self.status = metrics, body(name), {}

    def write(self, minute: float, **changes: object) -> None:
        old, new = self.status, deepcopy(self.status)
        for key, value in changes.items():
            if key == "stages":
                for stage, fields in value.items():  # type: ignore[union-attr]
                    new.setdefault("stages", {}).setdefault(stage, {}).update(fields)
            else:
                new[key] = value
        self.metrics.observe_transition(old, new, self.body, now=T0 + timedelta(minutes=minute))
        self.status = new


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics()


@pytest.fixture
def endpoint(metrics: OperatorMetrics) -> Iterator[str]:
    server = metrics.start_server(port=0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return samples(response.read().decode())


def run_two_jobs(metrics: OperatorMetrics) -> tuple[Job, Job]:
    a = Job(metrics, "a")
    a.write(0, phase="Pending")
    a.write(0.5, phase="Provisioning", cluster={"name": "rlhf-a", "reused": False})
    a.write(1.5, conditions=[READY])
    a.write(2, phase="Running", stage="sft",
            stages={"sft": {"state": "Running", "attempts": 1, "startTime": at(1.5),
                            "rayJob": "a-sft-1"}})  # fmt: skip
    a.write(32, stages={"sft": {"state": "Succeeded", "completionTime": at(31.5)}})
    a.write(33, stage="reward",
            stages={"reward": {"state": "Running", "attempts": 1, "startTime": at(32),
                               "rayJob": "a-reward-1"}})  # fmt: skip
    a.write(39, stages={"reward": {"failures": 1}})
    a.write(40, stages={"reward": {"attempts": 2, "rayJob": "a-reward-2"}})
    a.write(52, stages={"reward": {"state": "Succeeded", "completionTime": at(52)}})
    a.write(53, phase="Succeeded", completionTime=at(53))

    b = Job(metrics, "b")
    # b first records a warm cluster that another job wins, then claims `rlhf-a`.
    b.write(59, phase="Provisioning", cluster={"name": "rlhf-x", "reused": True})
    b.write(59.5, cluster={"name": "rlhf-a", "reused": True})
    b.write(60, conditions=[READY])
    b.write(61, phase="Running", stage="ppo",
            stages={"ppo": {"state": "Running", "attempts": 1, "startTime": at(61),
                            "rayJob": "b-ppo-1"}})  # fmt: skip
    b.write(70, stages={"ppo": {"state": "Failed", "completionTime": at(70)}})
    b.write(70, phase="Failed", message="stage ppo failed 3 times")
    return a, b


def test_endpoint_shows_phases_durations_retries_pool_and_latency(
    metrics: OperatorMetrics, endpoint: str
) -> None:
    before = scrape(endpoint)
    assert value(before, "rlhf_operator_jobs", phase="Running") == 0
    assert value(before, "rlhf_operator_stage_retries_total", stage="ppo") == 0

    run_two_jobs(metrics)
    metrics.observe_pool_expiry()

    @metrics.count_reconcile_errors
    def reconcile() -> None:
        raise RuntimeError("API server unavailable")

    with pytest.raises(RuntimeError):
        reconcile()

    got = scrape(endpoint)
    assert value(got, "rlhf_operator_jobs", phase="Succeeded") == 1
    assert value(got, "rlhf_operator_jobs", phase="Failed") == 1
    assert value(got, "rlhf_operator_jobs", phase="Running") == 0
    assert value(got, "rlhf_operator_jobs_finished_total", phase="Succeeded") == 1
    assert value(got, "rlhf_operator_jobs_finished_total", phase="Failed") == 1

    # SFT took 30 min; reward took 20 min over two attempts; PPO failed after 9 min.
    sft = {"stage": "sft", "state": "Succeeded"}
    assert value(got, "rlhf_operator_stage_duration_seconds_count", **sft) == 1
    assert value(got, "rlhf_operator_stage_duration_seconds_sum", **sft) == 30 * 60
    assert value(got, "rlhf_operator_stage_duration_seconds_bucket", le="1800.0", **sft) == 1
    assert value(got, "rlhf_operator_stage_duration_seconds_bucket", le="900.0", **sft) == 0
    reward = {"stage": "reward", "state": "Succeeded"}
    assert value(got, "rlhf_operator_stage_duration_seconds_sum", **reward) == 20 * 60
    ppo = {"stage": "ppo", "state": "Failed"}
    assert value(got, "rlhf_operator_stage_duration_seconds_sum", **ppo) == 9 * 60

    assert value(got, "rlhf_operator_stage_retries_total", stage="reward") == 1
    assert value(got, "rlhf_operator_stage_retries_total", stage="sft") == 0
    assert value(got, "rlhf_operator_warm_pool_hits_total") == 1
    assert value(got, "rlhf_operator_warm_pool_misses_total") == 1
    assert value(got, "rlhf_operator_warm_pool_expiries_total") == 1
    assert value(got, "rlhf_operator_reconcile_errors_total", error="RuntimeError") == 1

    # a: applied at 0, first RayJob at 1.5 min; b: applied at 0, first RayJob at 61 min.
    assert value(got, "rlhf_operator_apply_to_first_rayjob_seconds_count") == 2
    assert value(got, "rlhf_operator_apply_to_first_rayjob_seconds_sum") == 90 + 61 * 60


def test_resuming_after_restart_counts_nothing_twice(metrics: OperatorMetrics) -> None:
    a, b = run_two_jobs(metrics)
    first = samples(metrics.exposition().decode())

    # A restarted operator sees each job's persisted status again: old == new.
    fresh = OperatorMetrics()
    for job in (a, b):
        metrics.observe_transition(job.status, job.status, job.body)
        fresh.observe_transition(job.status, job.status, job.body)
    assert samples(metrics.exposition().decode()) == first
    again = samples(fresh.exposition().decode())
    assert value(again, "rlhf_operator_jobs", phase="Succeeded") == 1
    assert value(again, "rlhf_operator_warm_pool_misses_total") == 0
    assert value(again, "rlhf_operator_apply_to_first_rayjob_seconds_count") == 0


def test_a_stale_read_that_repeats_a_write_counts_nothing_twice(metrics: OperatorMetrics) -> None:
    a = Job(metrics, "a")
    a.write(0, phase="Provisioning", cluster={"name": "rlhf-a"}, conditions=[READY])
    stale: dict = {}  # the watch has not delivered that write when the next tick runs
    metrics.observe_transition(stale, a.status, a.body)
    got = samples(metrics.exposition().decode())
    assert value(got, "rlhf_operator_warm_pool_misses_total") == 1


def test_models_and_kopf_extras_are_accepted_and_deleted_jobs_leave_the_gauge(
    metrics: OperatorMetrics,
) -> None:
    running = RLHFJobStatus.model_validate(
        {"phase": "Running", "stage": "sft",
         "stages": {"sft": {"state": "Running", "attempts": 3, "failures": 2, "rayJob": "c-sft-3"},
                    "reward": {"state": "Pending"}}}
    )  # fmt: skip
    # kopf keeps its own bookkeeping under status.kopf: it must be ignored, not rejected.
    metrics.observe_transition({"kopf": {"progress": {}}}, running, body("c"))
    got = samples(metrics.exposition().decode())
    assert value(got, "rlhf_operator_jobs", phase="Running") == 1
    assert value(got, "rlhf_operator_stage_retries_total", stage="sft") == 2

    # Suspended and resumed: a new attempt that follows no failure is no retry.
    resumed = running.model_copy(deep=True)
    resumed.stages["sft"].attempts = 4
    metrics.observe_transition(running, resumed, body("c"))
    got = samples(metrics.exposition().decode())
    assert value(got, "rlhf_operator_stage_retries_total", stage="sft") == 2

    metrics.forget_job("ml", "c")
    got = samples(metrics.exposition().decode())
    assert value(got, "rlhf_operator_jobs", phase="Running") == 0


async def test_async_reconcile_errors_are_counted_and_reraised(metrics: OperatorMetrics) -> None:
    @metrics.count_reconcile_errors
    async def reconcile() -> str:
        raise TimeoutError("watch stream stalled")

    with pytest.raises(TimeoutError):
        await reconcile()
    got = samples(metrics.exposition().decode())
    assert value(got, "rlhf_operator_reconcile_errors_total", error="TimeoutError") == 1


def test_instances_are_isolated() -> None:
    one, two = OperatorMetrics(), OperatorMetrics()
    one.observe_pool_expiry(3)
    assert value(samples(two.exposition().decode()), "rlhf_operator_warm_pool_expiries_total") == 0
