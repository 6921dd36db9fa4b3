"""The engine defaults the model_servers role hands to the model_instances filter.

Read from the role's defaults/main.yml and laid out as its vars/main.yml lays
them out (``_model_servers_defaults``), so that tests render command lines
with the settings the role would use.
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEFAULTS = Path(__file__).resolve().parents[1] / "roles" / "model_servers" / "defaults" / "main.yml"


def model_servers_defaults() -> dict:
    defaults = yaml.safe_load(DEFAULTS.read_text())
    return {
        section: defaults[f"model_servers_{section}_defaults"]
        for section in ("llamacpp", "llamacpp_gpu", "llamacpp_multi_gpu", "vllm", "vllm_gpu", "vllm_cpu")
    }
