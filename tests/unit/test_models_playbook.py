"""models.yml (which site.yml runs) changes one host at a time unless told
otherwise: a model with replicas on several hosts is never replaced on all of
them at once."""

from __future__ import annotations

from pathlib import Path

import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

ROOT = Path(__file__).resolve().parents[2]


def serial(extra_vars: dict) -> str:
    # The play that runs the models (the first starts the waiting ranks of
    # models that span hosts, on all their hosts together).
    play = yaml.safe_load((ROOT / "playbooks" / "models.yml").read_text())[-1]
    return str(Templar(loader=DataLoader(), variables=extra_vars).template(trust_as_template(play["serial"])))


def test_hosts_change_one_at_a_time_by_default():
    assert serial({}) == "1"


def test_an_operator_may_change_every_host_together():
    assert serial({"cortex_models_serial": "100%"}) == "100%"
