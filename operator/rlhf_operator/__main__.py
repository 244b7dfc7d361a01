"""`python -m rlhf_operator` / `rlhf-operator`: run the operator (kopf) against the current cluster.

Credentials: in-cluster inside a pod, else the current kubeconfig. All namespaces by default.
With `--leader-election` (the chart's replicas), the replica first waits as a standby until it
holds the Lease (leader.py), then runs kopf until it is stopped (it then hands the Lease back)
or loses the Lease (it then exits with status 1; Kubernetes restarts it as a standby).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from rlhf_operator import health, kube, leader
from rlhf_operator.metrics import DEFAULT_METRICS_PORT, METRICS, start_metrics_server

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
EXIT_LOST_LEADERSHIP = 1

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rlhf-operator", description="Run the RLHF Operator (RLHFJob -> KubeRay)."
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="serve only this namespace (repeatable); all namespaces when absent",
    )
    parser.add_argument(
        "--liveness",
        default=DEFAULT_LIVENESS,
        help=f"probe endpoint: /healthz (liveness) and /readyz (readiness) on its host and port "
        f"(default {DEFAULT_LIVENESS}; '' = none)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="serve Prometheus metrics on :PORT/metrics (default %(default)s; 0 = none)",
    )
    parser.add_argument(
        "--leader-election",
        action="store_true",
        help="run as one of several replicas: only the holder of a coordination.k8s.io Lease "
        "acts, the others wait to take over",
    )
    parser.add_argument(
        "--lease-name", default=leader.DEFAULT_LEASE, help="the Lease's name (%(default)s)"
    )
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="the Lease's namespace (default: $POD_NAMESPACE, else 'default')",
    )
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=10.0,
        help="seconds a standby waits on an unrenewed Lease before taking over (%(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="log what the operator does")
    parser.add_argument("--debug", action="store_true", help="log kopf's internals too")
    return parser.parse_args(argv)


def lease_config(args: argparse.Namespace) -> leader.LeaseConfig:
    """Renew deadline 70 % and retry period 10 % of the duration: a standby notices the last
    renewal within a retry period and takes over a retry period after the Lease expired, so a
    killed leader is replaced within duration + 2.2 retry periods (10 s: 12.2 s)."""
    duration = args.lease_duration
    return leader.LeaseConfig(
        namespace=args.lease_namespace,
        name=args.lease_name,
        duration=duration,
        renew_deadline=0.7 * duration,
        retry_period=0.1 * duration,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import rlhf_operator.handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    if args.metrics_port:
        start_metrics_server(args.metrics_port)
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    status = health.Health()
    probes = await health.serve(status, args.liveness) if args.liveness else None
    elector: leader.LeaderElector | None = None
    stop = asyncio.Event()
    keeper: asyncio.Task[None] | None = None
    try:
        if args.leader_election:
            kube.configure()
            # Imported while standing by, not after taking over (kopf's startup waits for it).
            preloading = asyncio.get_running_loop().run_in_executor(None, kube.preload)
            elector = leader.LeaderElector(lease_config(args))
            status.identity = elector.identity
            status.ready = lambda: elector.contacted
            status.leader = lambda: elector.leading
            METRICS.set_leader(False)
            logger.info("leader election: %s waits for Lease %s", elector.identity, args.lease_name)
            await leader.acquire(elector)
            await preloading
            METRICS.set_leader(True)

            def lost() -> None:
                status.lost = True
                METRICS.set_leader(False)
                stop.set()

            keeper = asyncio.create_task(leader.keep(elector, lost), name="lease renewal")
        settings = kopf.OperatorSettings()
        # A single-namespace install is granted no cluster-scoped rights (a Role, not a
        # ClusterRole): kopf must then not scan for CRDs and namespaces, or it would log 403s.
        settings.scanning.disabled = bool(args.namespace)
        await kopf.operator(
            settings=settings,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            # No kopf peering: the Lease decides who runs (see leader.py for why).
            standalone=True,
            stop_flag=stop,
        )
        return EXIT_LOST_LEADERSHIP if status.lost else 0
    finally:
        if keeper is not None:
            keeper.cancel()
        if elector is not None and not status.lost:
            await leader.release(elector)
        if probes is not None:
            await probes.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
