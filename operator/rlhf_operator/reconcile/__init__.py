"""Reconciling an RLHFJob: the pure state machine (machine; its cluster seam: cluster; the
decision it builds: draft), KubeRay status reading (kuberay), status helpers (conditions), and
the driver that connects them to the API (driver)."""

from rlhf_operator.reconcile.conditions import status_patch
from rlhf_operator.reconcile.machine import reconcile, reject
from rlhf_operator.reconcile.model import (
    Action,
    ClusterObservation,
    CreateCluster,
    CreateRayJob,
    Decision,
    DeleteCluster,
    DeleteJob,
    DeleteRayJob,
    Event,
    Observed,
    PinSpec,
    RayJobObservation,
)

__all__ = [
    "Action",
    "ClusterObservation",
    "CreateCluster",
    "CreateRayJob",
    "Decision",
    "DeleteCluster",
    "DeleteJob",
    "DeleteRayJob",
    "Event",
    "Observed",
    "PinSpec",
    "RayJobObservation",
    "reconcile",
    "reject",
    "status_patch",
]
