"""Bad values fail `helm install` with a message that names the field (values.schema.json and the
templates' own checks), and every value in values.yaml is documented and schema-checked."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from chart_helpers import CHART, RELEASE, run_helm

BAD_VALUES = [
    # (--set, text the error must contain: the field, and what is wrong with it)
    ("watchNamespace=Team_A", ["/watchNamespace", "does not match pattern"]),
    ("trainer.namespaces[0]=Bad_NS", ["/trainer/namespaces/0", "does not match pattern"]),
    ("metrics.port=70000", ["/metrics/port", "maximum"]),
    ("operator.healthPort=0", ["/operator/healthPort", "minimum"]),
    ("operator.logLevel=loud", ["/operator/logLevel", "info", "verbose", "debug"]),
    ("image.pullPolicy=Sometimes", ["/image/pullPolicy", "IfNotPresent"]),
    ("crds.enabld=false", ["/crds", "enabld"]),  # a typo is an error, not silently ignored
    ("watchNamespaces=team-a", ["watchNamespaces", "not allowed"]),
    ("metrics.serviceMonitor.interval=30", ["/metrics/serviceMonitor/interval", "string"]),
    ("resources.limits.memory=lots", ["/resources/limits/memory", "does not match pattern"]),
    ("warmPool.maxPooledClusters=-1", ["/warmPool/maxPooledClusters", "minimum"]),
    ("networkPolicy.rayClientNamespaces[0]=Ray_System", ["/networkPolicy/rayClientNamespaces/0"]),
    # cross-field checks in the templates
    ("metrics.port=8080", ["metrics.port", "operator.healthPort"]),
    ("metrics.serviceMonitor.enabled=true", ["metrics.serviceMonitor.enabled", "metrics.service"]),
    ("serviceAccount.create=false", ["serviceAccount.name is required"]),
]


@pytest.mark.parametrize(("setting", "expected"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_fails_naming_the_field(helm: str, setting: str, expected: list[str]) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", setting)
    assert done.returncode != 0, f"--set {setting} was accepted"
    for text in expected:
        assert text in done.stderr, f"--set {setting}: {text!r} not in:\n{done.stderr}"


def _leaves(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in {"resources", "podSecurityContext",
                                                              "securityContext"}:  # fmt: skip
            out += _leaves(value, f"{path}.")
        else:
            out.append(path)
    return out


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = text.splitlines()
    for path in _leaves(values):
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"{path} is not in values.schema.json"
            node = node["properties"][part]
        assert node.get("description"), f"{path} has no description in values.schema.json"
        # values.yaml: a `# --` comment on the lines just above the key (or its parent's).
        key = path.rsplit(".", 1)[-1]
        index = next(i for i, line in enumerate(lines) if re.match(rf"^\s*{key}:", line))
        above = "\n".join(lines[max(index - 4, 0) : index])
        parent_documented = "." in path
        assert "# --" in above or parent_documented, f"{path} has no `# --` comment"
    # The schema is strict: unknown keys are typos.
    assert schema["additionalProperties"] is False
