"""The RLHFJob API (rlhf.dev/v1alpha1): pydantic models that are the source of truth for the CRD.

Import-light on purpose (pydantic only): the trainer and the CRD generator use it too.
"""

from rlhf_operator.api.errors import format_validation_error
from rlhf_operator.api.job import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    RLHFJob,
)
from rlhf_operator.api.spec import DEFAULT_TRAINER_IMAGE, RULES, STAGE_ORDER, RLHFJobSpec
from rlhf_operator.api.status import RLHFJobStatus, StageStatus, is_terminal

__all__ = [
    "API_VERSION",
    "DEFAULT_TRAINER_IMAGE",
    "GROUP",
    "KIND",
    "PLURAL",
    "RULES",
    "SHORT_NAMES",
    "SINGULAR",
    "STAGE_ORDER",
    "VERSION",
    "RLHFJob",
    "RLHFJobSpec",
    "RLHFJobStatus",
    "StageStatus",
    "format_validation_error",
    "is_terminal",
]
