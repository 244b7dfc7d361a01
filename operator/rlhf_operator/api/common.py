"""Shared pydantic base and small Kubernetes-shaped types used by the RLHFJob API.

Every model here is part of the CRD: field descriptions become the schema's descriptions,
``Field`` bounds become OpenAPI ranges, and ``Literal`` types become enums. Keep them documented.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Quantity = int | str
"""A Kubernetes resource quantity ("4", "16Gi", 2): int-or-string in the CRD."""


class ApiModel(BaseModel):
    """Base for all API models: camelCase on the wire, unknown fields rejected, defaults filled."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, as it appears in a manifest (``None`` fields omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ResourceRequirements(ApiModel):
    """CPU/memory/GPU requests and limits of a container, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Minimum resources, e.g. {cpu: '4', memory: 16Gi}."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Maximum resources, e.g. {memory: 32Gi}."
    )


class Toleration(ApiModel):
    """A Pod toleration, e.g. for the `nvidia.com/gpu` taint of a GPU node pool."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Exists matches any value; Equal matches `value`."
    )
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class SecretRef(ApiModel):
    """A Secret in the job's own namespace, referenced by name (never read by the operator)."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a Secret in the RLHFJob's namespace.",
    )
