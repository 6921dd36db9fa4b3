#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: gpu_facts
short_description: Read the NVIDIA GPUs of a host through NVML
version_added: 0.1.0
description:
  - Reads every NVIDIA GPU of the host through NVML with nvidia-ml-py (C(pynvml)),
    giving name, UUID, PCI bus id, compute capability, memory, and MIG mode, with
    the driver's version and the newest CUDA version it supports.
  - A host without the driver is not an error unless O(fail_without_driver=true);
    the result then says C(driver_present=false) and why.
  - Sets the fact C(cortex_gpus) to the result.
author:
  - cortex.serving maintainers (!UNKNOWN)
requirements:
  - nvidia-ml-py (imported as C(pynvml)) on the host
options:
  fail_without_driver:
    description: Fail when NVML or the NVIDIA driver is missing instead of reporting it.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Only reads; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
  facts:
    support: full
    description: Returns the result as the fact C(cortex_gpus).
"""

EXAMPLES = r"""
- name: Read the GPUs
  cortex.serving.gpu_facts:

- name: Show the compute capability of GPU 0
  ansible.builtin.debug:
    msg: "{{ cortex_gpus.gpus[0].compute_capability }}"
  when: cortex_gpus.driver_present

- name: Refuse a host whose driver is not loaded
  cortex.serving.gpu_facts:
    fail_without_driver: true
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to the host's variables.
  returned: always
  type: dict
  contains:
    cortex_gpus:
      description: What NVML reported.
      returned: always
      type: dict
      contains:
        driver_present:
          description: Whether NVML and the NVIDIA driver answered.
          type: bool
          sample: true
        reason:
          description: Why there is no driver, when there is none.
          type: str
          returned: when driver_present is false
          sample: "no NVIDIA driver: NVML Shared Library Not Found"
        driver_version:
          description: The NVIDIA driver version.
          type: str
          returned: when driver_present is true
          sample: "580.159.04"
        cuda_driver_version:
          description: The newest CUDA version the driver supports.
          type: str
          returned: when driver_present is true
          sample: "13.0"
        pci_devices:
          description:
            - NVIDIA GPUs on the PCI bus, read from sysfs, with or without a driver (what the
              nvidia_driver role installs for).
          returned: always
          type: list
          elements: dict
          sample:
            - pci_bus_id: "0000:00:07.0"
              device_id: "2330"
        gpus:
          description: One entry per GPU, in NVML index order.
          type: list
          elements: dict
          sample:
            - index: 0
              name: NVIDIA H100 80GB HBM3
              uuid: GPU-5e1a3f0c-0000-0000-0000-000000000000
              pci_bus_id: "00000000:00:07.0"
              compute_capability: "9.0"
              cuda_arch: "90"
              memory_total_mib: 81559
              memory_free_mib: 81001
              memory_used_mib: 558
              mig_mode: disabled
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.cortex.serving.plugins.module_utils._gpu_facts import (
    NoDriverError,
    pci_devices,
    read_gpus,
)

try:
    import pynvml

    PYNVML_IMPORT_ERROR = None
except ImportError:
    pynvml = None
    PYNVML_IMPORT_ERROR = traceback.format_exc()


def main():
    module = AnsibleModule(
        argument_spec=dict(fail_without_driver=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    if pynvml is None:
        if module.params["fail_without_driver"]:
            module.fail_json(msg=missing_required_lib("nvidia-ml-py"), exception=PYNVML_IMPORT_ERROR)
        facts = {
            "driver_present": False,
            "reason": "no NVIDIA driver: nvidia-ml-py (pynvml) is not installed",
            "gpus": [],
        }
        facts["pci_devices"] = pci_devices()
        module.exit_json(changed=False, ansible_facts={"cortex_gpus": facts})

    try:
        facts = read_gpus(pynvml)
        facts["driver_present"] = True
    except NoDriverError as exc:
        if module.params["fail_without_driver"]:
            module.fail_json(msg=str(exc))
        facts = {"driver_present": False, "reason": str(exc), "gpus": []}
    except pynvml.NVMLError as exc:
        module.fail_json(msg="NVML failed: %s" % exc, exception=traceback.format_exc())
    facts["pci_devices"] = pci_devices()
    module.exit_json(changed=False, ansible_facts={"cortex_gpus": facts})


if __name__ == "__main__":
    main()
