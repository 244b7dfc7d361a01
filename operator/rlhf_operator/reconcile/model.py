"""The state machine's vocabulary: what it observes, what it decides (plain frozen data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_operator.api import RLHFJobStatus
from rlhf_operator.warmpool import PoolCluster


@dataclass(frozen=True)
class ClusterObservation:
    """What the operator knows of a RayCluster (from KubeRay's status)."""

    name: str
    ready: bool = False
    state: str | None = None
    deleting: bool = False
    job_label: str | None = None
    owner_uids: tuple[str, ...] = ()
    message: str | None = None  # what KubeRay says is wrong (status.reason, failing conditions)
    pool: PoolCluster | None = None  # its warm-pool labels, version and strict health
    suspended: bool = False  # spec.suspend: e.g. Kueue holds it until its queue admits it
    queue: str | None = None  # its Kueue LocalQueue (label kueue.x-k8s.io/queue-name)
    uid: str = ""
    auth_mode: str | None = None  # spec.authOptions.mode as stored (None: pruned by old KubeRay)
    pod_problem: str | None = None  # what its pods and their Warning Events say (not ready)

    @property
    def why(self) -> str | None:
        """Why it is not ready, as KubeRay and the pods tell it (None: nobody says)."""
        parts = [p for p in (self.message, self.pod_problem) if p]
        return "; ".join(parts) or None

    def owned_by(self, job: str, uid: str | None) -> bool:
        """Ours: owned by the job's uid, never by name alone (a cluster left by an earlier job
        of the same name carries our label); only when the job's uid is unknown, its label."""
        if uid:
            return uid in self.owner_uids
        return self.job_label == job


@dataclass(frozen=True)
class RayJobObservation:
    """What the operator knows of a RayJob: KubeRay's two statuses, read together."""

    name: str
    job_status: str = ""
    deployment_status: str = ""
    reason: str = ""
    message: str = ""
    deleting: bool = False
    owner_uids: tuple[str, ...] = ()
    stage: str = ""
    attempt: int = 0

    def owned_by(self, uid: str | None) -> bool:
        """Ours only when owned by the job's uid: a RayJob at our name left by an earlier job
        of the same name (behind KubeRay's finalizer or the garbage collector) is not."""
        return uid is None or uid in self.owner_uids


@dataclass(frozen=True)
class Observed:
    """The children of one job, as last seen: its cluster, the current attempt's RayJob and
    the earlier attempts' RayJobs that still exist (pruned after `runPolicy.keepAttempts`)."""

    cluster: ClusterObservation | None = None
    rayjob: RayJobObservation | None = None
    pool: tuple[PoolCluster, ...] = ()  # available warm clusters with the job's signature
    pooled_in_namespace: int = 0  # available warm clusters of any signature in the namespace
    earlier: tuple[RayJobObservation, ...] = ()


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class PinSpec:
    """Record the spec the job started with (done before any child is created)."""

    pinned: str


@dataclass(frozen=True)
class CreateCluster:
    """Create the RayCluster unless it exists (409 = already there)."""

    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


@dataclass(frozen=True)
class CreateNetworkPolicy:
    """Create a RayCluster's NetworkPolicy unless it exists (409 = already there)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class CreateProgress:
    """Create the job's RLHFJobProgress unless it exists (409 = already there)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class DeleteCluster:
    name: str


@dataclass(frozen=True)
class ClaimCluster:
    """Claim a warm-pool cluster: a merge-patch with its resourceVersion as precondition
    (409: someone else got it or it changed; the next reconcile decides again)."""

    name: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class ReleaseCluster:
    """Hand the job's cluster to the warm pool (a merge-patch: owner off, pool labels on)."""

    name: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class CreateRayJob:
    """Create one stage attempt's RayJob unless it exists."""

    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


@dataclass(frozen=True)
class DeleteRayJob:
    """Delete a RayJob (KubeRay stops its Ray job first)."""

    name: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the RLHFJob itself (ttlSecondsAfterFinished)."""


Action = (
    PinSpec
    | CreateCluster
    | CreateNetworkPolicy
    | CreateProgress
    | DeleteCluster
    | ClaimCluster
    | ReleaseCluster
    | CreateRayJob
    | DeleteRayJob
    | DeleteJob
)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the RLHFJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    """One reconcile's outcome: the next status, the actions (in order) and the events."""

    status: RLHFJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    wait: str | None = None  # finalizer only: why the job cannot be let go yet (retry soon)
