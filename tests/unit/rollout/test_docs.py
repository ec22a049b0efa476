"""docs/rollout.md names every rollout/capture metric and setting the code has."""

from __future__ import annotations

import re

from fixtures.servers import REPO_ROOT

from service.settings import Settings


def test_every_rollout_metric_and_setting_is_in_the_guide() -> None:
    guide = (REPO_ROOT / "docs" / "rollout.md").read_text()
    source = (REPO_ROOT / "service" / "rollout" / "metrics.py").read_text()
    names = set(re.findall(r'"(serving_(?:rollout|capture)_[a-z_]+)"', source))
    assert len(names) >= 15
    for name in names:
        assert f"`{name}" in guide, name
    for field in Settings.model_fields:
        if field.startswith(("rollout", "capture")):
            flag, env = f"`--{field.replace('_', '-')}`", f"`SERVING_{field.upper()}`"
            assert any(line.startswith(f"| {flag} | {env}") for line in guide.splitlines()), field
