#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: model_plan
short_description: Plan the GPU memory of a host's engine instances and check that it fits
version_added: 0.1.0
description:
  - The resource calculator. For each engine instance with GPUs it estimates the
    memory needed on each GPU, and for each GPU whether its instances fit.
  - llama.cpp instances are planned from their GGUF metadata (see
    M(cortex.serving.gguf_info)) and their command line, offloaded weights, the KV
    cache of the whole context with grouped-query attention counted, the compute
    buffer of one micro-batch, and a per-process CUDA overhead.
  - Layers are placed on GPUs as llama.cpp places them (layer split), or shared
    by all (tensor split). Sliding-window layers keep only the window of KV
    cache (unless C(--swa-full)); the experts of the layers C(--n-cpu-moe) names
    (all with C(--cpu-moe)) are counted in host memory, not on the GPUs.
  - When something does not fit, each llama.cpp model that does not fit gets
    the settings that would make it fit, each computed by planning again, namely the
    largest C(ctx_size) at its slots, the most slots at its context per slot, a
    q8_0 KV cache, and for a mixture of experts the fewest layers whose experts
    stay in host memory (C(n_cpu_moe)).
  - vLLM instances are planned from a Hugging Face config (or a parameter count)
    with dtype and quantization, and checked against the share of the GPU that
    C(--gpu-memory-utilization) gives vLLM, which vLLM takes whole.
  - Fails with the plan as a table when something does not fit, unless
    I(fail_when_over=false).
author:
  - cortex.serving maintainers (!UNKNOWN)
options:
  instances:
    description: The host's engine instances, as the C(cortex.serving.model_instances) filter returns them.
    type: list
    elements: dict
    required: true
  shapes:
    description:
      - Per model name, its shape. For llama.cpp, what M(cortex.serving.gguf_info) returned as C(model).
        For vLLM, C(hf_config) (the model's config.json) or C(parameter_count).
    type: dict
    default: {}
  gpus:
    description: The host's GPUs, as C(cortex_gpus.gpus) from M(cortex.serving.gpu_facts).
    type: list
    elements: dict
    default: []
  overhead_mib:
    description: Per-process overhead per GPU, by engine (C(llamacpp), C(vllm)), instead of the calibrated defaults.
    type: dict
    default: {}
  headroom_mib:
    description: Memory each GPU (and the host) keeps free beyond the plan.
    type: int
    default: 512
  host_memory_mib:
    description:
      - The host's memory. When given, what the GPU instances keep in host memory (input embeddings,
        layers not offloaded, experts kept on the CPU) must fit in it. 0 does not check.
    type: int
    default: 0
  fail_when_over:
    description: Fail when an instance or a GPU does not fit.
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: Only computes; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
"""

EXAMPLES = r"""
- name: Plan the GPU memory of this host's models
  cortex.serving.model_plan:
    instances: "{{ (cortex_models | cortex.serving.model_instances(inventory_hostname, cortex_gpus.gpus | length)).instances }}"
    shapes: "{{ model_shapes }}"
    gpus: "{{ cortex_gpus.gpus }}"
  register: plan

- name: Show the plan
  ansible.builtin.debug:
    msg: "{{ plan.table.splitlines() }}"
"""

RETURN = r"""
rows:
  description: One row per instance and GPU; sizes in bytes.
  returned: always
  type: list
  elements: dict
  sample:
    - model: llama-3-8b-q8
      replica: 0
      engine: llamacpp
      gpu: 0
      weights: 7695531008
      kv_cache: 8589934592
      compute: 296222720
      overhead: 536870912
      need: 17118559232
      allowed: 85521300000
      fits: true
gpus:
  description: Per GPU, its total, the planned use and what is left; sizes in bytes.
  returned: always
  type: list
  elements: dict
fits:
  description: Whether every instance and every GPU fits.
  returned: always
  type: bool
host:
  description: Per llama.cpp instance with GPUs, the bytes it keeps in host memory.
  returned: always
  type: list
  elements: dict
  sample:
    - model: gpt-oss-120b
      replica: 0
      bytes: 31602131200
host_total:
  description: Bytes the instances keep in host memory together.
  returned: always
  type: int
host_fits:
  description: Whether they fit I(host_memory_mib) (true when it was not given).
  returned: always
  type: bool
suggestions:
  description:
    - When something does not fit, per llama.cpp model that does not fit, the settings that would make the
      plan fit, each alone (C(llamacpp) is what to put in the model's C(llamacpp) section, C(why) says what it costs).
      An empty C(options) list means no such setting makes it fit.
  returned: always
  type: list
  elements: dict
  sample:
    - model: gpt-oss-120b
      options:
        - llamacpp: {n_cpu_moe: 14}
          why: "the experts of the first 14 of 36 layers in host memory: 22.7 GiB of host memory for this model"
unknown:
  description: Models with GPUs whose shape was not given, so they were not planned.
  returned: always
  type: list
  elements: str
pools:
  description: >-
    Each pool (llama-server in router mode) with its models and the resident set it was planned by:
    its I(max_resident) models that need the most GPU memory.
  type: list
  elements: dict
  returned: always
table:
  description: The plan as a text table in MiB.
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cortex.serving.plugins.module_utils._plan import PlanError, plan, table


def main():
    module = AnsibleModule(
        argument_spec=dict(
            instances=dict(type="list", elements="dict", required=True),
            shapes=dict(type="dict", default={}),
            gpus=dict(type="list", elements="dict", default=[]),
            overhead_mib=dict(type="dict", default={}),
            headroom_mib=dict(type="int", default=512),
            host_memory_mib=dict(type="int", default=0),
            fail_when_over=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        result = plan(
            params["instances"],
            params["shapes"],
            params["gpus"],
            params["overhead_mib"],
            params["headroom_mib"],
            params["host_memory_mib"],
        )
    except PlanError as exc:
        module.fail_json(msg=str(exc))
    text = table(result)
    if params["fail_when_over"] and not result["fits"]:
        module.fail_json(msg="the models do not fit this host's GPUs:\n" + text, table=text, **result)
    module.exit_json(changed=False, table=text, **result)


if __name__ == "__main__":
    main()
