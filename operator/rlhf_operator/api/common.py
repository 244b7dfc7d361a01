"""Shared pydantic base and small Kubernetes-shaped types used by the RLHFJob API.

Every model here is part of the CRD: field descriptions become the schema's descriptions,
``Field`` bounds become OpenAPI ranges, and ``Literal`` types become enums. Keep them documented.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
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


ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RESERVED_ENV_PREFIXES = ("RAY_AUTH_", "RLHF_")
"""Set by KubeRay (the Ray token) and by the operator (the job's identity): never the user's."""


class KeyRef(ApiModel):
    """One key of a Secret or ConfigMap in the job's namespace, referenced by name."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Secret or ConfigMap in the RLHFJob's namespace.",
    )
    key: str = Field(min_length=1, max_length=253, description="The key to read.")
    optional: bool | None = Field(default=None, description="Start even if it is missing.")


class EnvVarSource(ApiModel):
    """Where a variable's value comes from: a Secret key or a ConfigMap key (by name)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "message": "valueFrom: set exactly one of secretKeyRef or configMapKeyRef.",
                }
            ]
        }
    }

    secret_key_ref: KeyRef | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(default=None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("valueFrom: set exactly one of secretKeyRef or configMapKeyRef.")
        return self


class EnvVar(ApiModel):
    """An environment variable of the Ray containers: a literal value, or a Secret/ConfigMap
    key by name (use secretKeyRef for credentials such as HF_TOKEN: the value then never
    appears in a manifest)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.value) != has(self.valueFrom)",
                    "message": "set exactly one of value or valueFrom (secretKeyRef for "
                    "credentials).",
                },
                {
                    "rule": " && ".join(
                        f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES
                    ),
                    "message": "names starting with RAY_AUTH_ or RLHF_ are set by KubeRay and "
                    "the operator; pick another name.",
                },
            ]
        }
    }

    name: str = Field(
        min_length=1, max_length=256, pattern=ENV_NAME_PATTERN, description="Variable name."
    )
    value: str | None = Field(default=None, description="A literal value (not for secrets).")
    value_from: EnvVarSource | None = Field(
        default=None, description="Read the value from a Secret or ConfigMap key."
    )

    @model_validator(mode="after")
    def _checked(self) -> EnvVar:
        if self.name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(
                f"{self.name}: names starting with RAY_AUTH_ or RLHF_ are set by KubeRay and "
                "the operator; pick another name."
            )
        if (self.value is None) == (self.value_from is None):
            raise ValueError(
                f"{self.name}: set exactly one of value or valueFrom (secretKeyRef for "
                "credentials)."
            )
        return self


class NameRef(ApiModel):
    """A Secret or ConfigMap in the job's namespace, by name."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Its name.",
    )


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as environment variables (e.g. NCCL_* settings)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretRef) != has(self.configMapRef)",
                    "message": "envFrom: set exactly one of secretRef or configMapRef.",
                }
            ]
        }
    }

    secret_ref: NameRef | None = Field(default=None, description="A Secret, by name.")
    config_map_ref: NameRef | None = Field(default=None, description="A ConfigMap, by name.")
    prefix: str | None = Field(
        default=None, pattern=ENV_NAME_PATTERN, description="Prepended to every key."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("envFrom: set exactly one of secretRef or configMapRef.")
        return self
