"""Children the operator created stand in for their watched objects until the watch shows them
(reconcile/unseen.py), and only until then."""

from __future__ import annotations

import time

from rlhf_operator.api import RLHFJobStatus
from rlhf_operator.reconcile.driver import observe
from rlhf_operator.reconcile.kuberay import observe_cluster
from rlhf_operator.reconcile.model import ClusterObservation
from rlhf_operator.reconcile.unseen import Unseen

KIND = "rayclusters"


def created(name: str, uid: str) -> ClusterObservation:
    return observe_cluster({"metadata": {"name": name, "namespace": "ns", "uid": uid}})


def test_a_created_cluster_is_observed_before_the_watch_shows_it() -> None:
    unseen = Unseen()
    unseen.created(KIND, "ns", "a-ray", created("a-ray", "u1"))
    clusters = unseen.overlay(KIND, {})
    status = RLHFJobStatus.model_validate({"cluster": {"name": "a-ray"}})
    seen = observe("ns", status, clusters, {}, "a")
    assert seen.cluster is not None and seen.cluster.uid == "u1"
    assert list(clusters) == [("ns", "a-ray")]
    assert unseen.overlay("rayjobs", {}) == {}  # another kind is not affected


def test_the_watched_object_wins_and_ends_the_stand_in() -> None:
    unseen = Unseen()
    unseen.created(KIND, "ns", "a-ray", created("a-ray", "u1"))
    watched = observe_cluster(
        {"metadata": {"name": "a-ray", "uid": "u1"}, "status": {"state": "ready"}}
    )
    index = {("ns", "a-ray"): (watched,)}
    assert unseen.overlay(KIND, index)[("ns", "a-ray")] == (watched,)  # fresher than ours
    unseen.seen(KIND, "ns", "a-ray")
    assert len(unseen) == 0
    assert unseen.overlay(KIND, {}) == {}  # e.g. deleted since: the index says so, not we


def test_a_creation_the_watch_never_shows_stands_in_for_a_while_only() -> None:
    unseen = Unseen(ttl=0.05)
    unseen.created(KIND, "ns", "a-ray", created("a-ray", "u1"))
    assert ("ns", "a-ray") in unseen.overlay(KIND, {})
    time.sleep(0.1)
    assert unseen.overlay(KIND, {}) == {}
    assert len(unseen) == 0


def job(version: str, phase: str | None = None) -> dict:
    return {"metadata": {"uid": "j1", "resourceVersion": version}, "status": {"phase": phase}}


def test_the_jobs_own_write_does_not_wake_it_but_a_decision_not_carried_out_decides_again() -> None:
    unseen = Unseen()
    read, stored = job("5"), job("6", "Provisioning")
    unseen.job_written(read, stored)
    assert not unseen.again("j1")
    assert unseen.echo(stored)  # the write coming back: nothing new to decide
    assert not unseen.echo(job("7", "Provisioning"))  # someone else's write: it wakes the job
    assert len(unseen) == 0
    unseen.job_written(job("7"), job("8", "Provisioning"))
    unseen.unsettled(job("8", "Provisioning"))  # e.g. the claim of a warm cluster was lost
    assert unseen.again("j1") and not unseen.again("j1")  # one more look, at once


def test_a_reconcile_before_the_watch_shows_the_write_decides_on_the_job_as_written() -> None:
    unseen = Unseen()
    read, stored = job("5"), job("6", "Provisioning")
    unseen.job_written(read, stored)
    assert unseen.latest(read) is stored  # kopf's copy is the version the write replaced
    assert unseen.latest(job("8", "Running")) == job("8", "Running")  # newer than ours: kopf's
    unseen.forget_job("j1")
    assert unseen.latest(read) is read


def test_a_job_that_found_a_child_other_than_its_index_said_waits_for_its_next_change() -> None:
    """A lost claim of a warm cluster: the cluster's owner and label become the winner's, so
    only this interest wakes the loser when its index shows who got it."""
    unseen = Unseen()
    unseen.await_change(KIND, "ns", "warm-ray", "loser")
    assert unseen.seen(KIND, "ns", "other-ray") == set()
    assert unseen.seen(KIND, "ns", "warm-ray") == {"loser"}
    assert unseen.seen(KIND, "ns", "warm-ray") == set()  # once
