"""`python -m rlhf_operator` / `rlhf-operator`: run the operator (kopf) against the current cluster.

Credentials: in-cluster inside a pod, else the current kubeconfig. All namespaces by default.
"""

from __future__ import annotations

import argparse

import kopf

from rlhf_operator.metrics import DEFAULT_METRICS_PORT, start_metrics_server

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


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
        help=f"health endpoint for the liveness probe (default {DEFAULT_LIVENESS}; '' = none)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="serve Prometheus metrics on :PORT/metrics (default %(default)s; 0 = none)",
    )
    parser.add_argument("--verbose", action="store_true", help="log what the operator does")
    parser.add_argument("--debug", action="store_true", help="log kopf's internals too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import rlhf_operator.handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    if args.metrics_port:
        start_metrics_server(args.metrics_port)
    settings = kopf.OperatorSettings()
    # A single-namespace install is granted no cluster-scoped rights (a Role, not a ClusterRole):
    # kopf must then not scan for CRDs and namespaces, or it would log 403s.
    settings.scanning.disabled = bool(args.namespace)
    kopf.run(
        settings=settings,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        standalone=True,  # one replica, no peering objects (the chart runs exactly one)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
