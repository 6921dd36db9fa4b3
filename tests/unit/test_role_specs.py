"""Every role documents each of its variables, and nothing else, in
meta/argument_specs.yml; literal defaults agree with defaults/main.yml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).parents[2] / "roles").iterdir() if p.is_dir())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_specs_and_defaults_name_the_same_variables(role):
    defaults = load(role / "defaults" / "main.yml")
    options = load(role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    # A required option has no default.
    assert set(defaults) == {name for name, spec in options.items() if not spec.get("required")}


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_variables_carry_the_role_prefix(role):
    defaults = load(role / "defaults" / "main.yml")
    assert [name for name in defaults if not name.startswith(role.name + "_")] == []


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_literal_defaults_match_the_spec(role):
    defaults = load(role / "defaults" / "main.yml")
    options = load(role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    for name, value in defaults.items():
        if "{{" in yaml.safe_dump(value):
            assert "default" not in options[name], f"{name}: a templated default is documented in prose"
            continue
        assert options[name].get("default") == value, name
