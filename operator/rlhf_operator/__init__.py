"""RLHF Operator: reconciles RLHFJob resources into a KubeRay cluster and one RayJob per stage."""

__version__ = "0.1.0"
