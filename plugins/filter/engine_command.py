# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: llamacpp_command
short_description: Render the llama-server command line of a model entry
version_added: 0.1.0
description:
  - Turns one entry of C(cortex_models) (with its resolved C(model_file)) into
    the argument list passed to the llama-server container.
  - The collection also has the filter C(vllm_command), the same for C(vllm serve).
positional: defaults
options:
  _input:
    description: The model entry.
    type: dict
    required: true
  defaults:
    description: The role's llama.cpp defaults; the entry's C(llamacpp) section overrides them.
    type: dict
    required: false
"""

EXAMPLES = r"""
- name: Show the command line of a model
  ansible.builtin.debug:
    msg: "{{ model | cortex.serving.llamacpp_command({'ctx_size': 4096}) }}"
"""

RETURN = r"""
_value:
  description: The arguments, after the image's entrypoint.
  type: list
  elements: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    EngineCommandError,
    llamacpp_command,
    vllm_command,
)


def _llamacpp_command(model, defaults=None):
    try:
        return llamacpp_command(model, defaults)
    except EngineCommandError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def _vllm_command(model, defaults=None):
    try:
        return vllm_command(model, defaults)
    except EngineCommandError as exc:
        raise AnsibleFilterError(str(exc)) from exc


class FilterModule(object):
    def filters(self):
        return {"llamacpp_command": _llamacpp_command, "vllm_command": _vllm_command}
