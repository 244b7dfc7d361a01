"""Operator-wide tenancy settings, from the environment (the chart sets them; see values.yaml).

Plain constants, no kopf: the pure state machine reads them.
"""

from __future__ import annotations

import os


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


NETWORK_POLICIES = os.environ.get("RLHF_NETWORK_POLICIES", "true").lower() != "false"
"""Give every RayCluster a NetworkPolicy (builders.build_network_policy). Off only where the
cluster's network plugin enforces none and the operator may not create them."""

RAY_CLIENT_NAMESPACES = sorted(
    set(_names(os.environ.get("RLHF_RAY_CLIENT_NAMESPACES", "")))
    | set(_names(os.environ.get("POD_NAMESPACE", "")))
)
"""Namespaces whose pods may reach a RayCluster's GCS, dashboard and client ports: KubeRay's
(its controller polls the dashboard for RayJob status) and the operator's own (POD_NAMESPACE)."""

MAX_POOLED_CLUSTERS = int(os.environ.get("RLHF_MAX_POOLED_CLUSTERS", "4"))
"""Warm-pool clusters kept per namespace; a finished job's cluster beyond that is deleted."""
