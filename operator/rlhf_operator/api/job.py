"""The RLHFJob resource as a whole, and its API coordinates (one source of truth for both)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlhf_operator.api.common import ApiModel
from rlhf_operator.api.spec import RLHFJobSpec
from rlhf_operator.api.status import RLHFJobStatus

GROUP = "rlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFJob"
PLURAL = "rlhfjobs"
SINGULAR = "rlhfjob"
SHORT_NAMES = ["rlhf"]


class ObjectMeta(ApiModel):
    """The part of metadata the API cares about (the rest is kept, not validated)."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str = Field(default="rlhfjob", description="Job name.")
    namespace: str | None = Field(default=None, description="Namespace.")


class RLHFJob(ApiModel):
    """A whole RLHF pipeline: SFT, reward model, PPO and evaluation on one Ray cluster."""

    api_version: Literal["rlhf.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["RLHFJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: RLHFJobSpec
    status: RLHFJobStatus | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> RLHFJob:
        """Validate a manifest dict (as loaded from YAML or received from the API)."""
        return cls.model_validate(manifest)
