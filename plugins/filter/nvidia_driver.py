# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: nvidia_driver_plan
short_description: Choose the NVIDIA driver packages, kernel module flavor and holds for a host
version_added: 0.1.0
description:
  - Decides, for Debian 12, Ubuntu 22.04/24.04 and RHEL/Rocky 9, the packages of a pinned driver
    version, the open or proprietary kernel modules (by GPU generation, unless overridden),
    DKMS or Ubuntu's precompiled signed modules, and the package names to hold against upgrades.
  - Refuses a choice the host's GPUs cannot load, naming the GPU.
  - The collection also has the filters C(nvidia_version_mismatch), which turns nvidia-smi's
    driver/library version mismatch into advice (empty when there is none), and
    C(nvidia_gpus_from_pci), the GPUs' generations from their PCI device IDs before a driver is loaded,
    C(nvidia_toolkit_packages), the four NVIDIA Container Toolkit packages pinned to one version,
    and C(nvidia_wanted), whether a host gets the NVIDIA stack (C(cortex_nvidia) and its PCI bus).
positional: distribution, major_version, version, modules, module_source, gpus
options:
  _input:
    description: The driver branch, for example C(535).
    type: str
    required: true
  distribution:
    description: C(ansible_facts.distribution).
    type: str
    required: true
  major_version:
    description: C(ansible_facts.distribution_major_version).
    type: str
    required: true
  version:
    description: The exact driver version, for example C(535.261.03).
    type: str
    required: true
  modules:
    description: C(auto), C(open) or C(proprietary).
    type: str
    default: auto
  module_source:
    description: C(auto), C(dkms) or C(precompiled) (Ubuntu only).
    type: str
    default: auto
  gpus:
    description: The GPUs as gpu_facts reports them (name, compute_capability).
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Show what the host would get
  ansible.builtin.debug:
    msg: >-
      {{ '535' | cortex.serving.nvidia_driver_plan(ansible_facts.distribution,
         ansible_facts.distribution_major_version, '535.261.03') }}
"""

RETURN = r"""
_value:
  description: C(platform), C(family), C(modules), C(module_source), C(packages), C(hold) and C(reasons).
  type: dict
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.cortex.serving.plugins.module_utils._driver_plan import (
    DriverPlanError,
    driver_plan,
    gpus_from_pci,
    nvidia_wanted,
    toolkit_packages,
    version_mismatch,
)


def _plan(branch, distribution, major_version, version, modules="auto", module_source="auto", gpus=None):
    try:
        return driver_plan(distribution, major_version, branch, version, modules, module_source, gpus)
    except DriverPlanError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def _wanted(setting, pci_devices):
    try:
        return nvidia_wanted(setting, pci_devices)
    except DriverPlanError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def _mismatch(output):
    return version_mismatch(output or "") or ""


class FilterModule(object):
    def filters(self):
        return {
            "nvidia_driver_plan": _plan,
            "nvidia_version_mismatch": _mismatch,
            "nvidia_gpus_from_pci": gpus_from_pci,
            "nvidia_toolkit_packages": toolkit_packages,
            "nvidia_wanted": _wanted,
        }
