# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading NVIDIA GPUs through NVML (nvidia-ml-py, imported as ``pynvml``).

The NVML module is passed in, so tests can hand over a stand-in.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

# NVML return codes (nvml.h) that mean "no usable driver here".
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_NOT_SUPPORTED = 3
_NO_DRIVER_CODES = (_NVML_ERROR_DRIVER_NOT_LOADED, _NVML_ERROR_LIBRARY_NOT_FOUND)

_MIB = 1024 * 1024


def pci_devices(sysfs="/sys/bus/pci/devices"):
    """NVIDIA display-class devices on the PCI bus (no driver needed): bus id and device id."""
    found = []
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return found
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "vendor")) as vendor:
                if vendor.read().strip() != "0x10de":
                    continue
            with open(os.path.join(sysfs, entry, "class")) as klass:
                if not klass.read().strip().startswith("0x03"):
                    continue  # the GPU's audio function, NVSwitches, ...
            with open(os.path.join(sysfs, entry, "device")) as device:
                found.append({"pci_bus_id": entry, "device_id": device.read().strip().replace("0x", "")})
        except (IOError, OSError):
            continue
    return found


class NoDriverError(Exception):
    """NVML is missing or no NVIDIA driver is loaded."""


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _cuda_version(encoded):
    """NVML encodes the CUDA version as 1000 * major + 10 * minor (13000 -> '13.0')."""
    return "%d.%d" % (encoded // 1000, (encoded % 1000) // 10)


def _mig_mode(nvml, handle):
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) == _NVML_ERROR_NOT_SUPPORTED:
            return "unsupported"
        raise
    return "enabled" if current == 1 else "disabled"


def read_gpus(nvml):
    """Driver and CUDA versions and one record per GPU, or NoDriverError."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) in _NO_DRIVER_CODES:
            raise NoDriverError("no NVIDIA driver: %s" % _text(exc)) from exc
        raise
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                    "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                    "compute_capability": "%d.%d" % (major, minor),
                    # The CUDA architecture number images are built for (sm_89 -> "89").
                    "cuda_arch": "%d%d" % (major, minor),
                    "memory_total_mib": memory.total // _MIB,
                    "memory_free_mib": memory.free // _MIB,
                    "memory_used_mib": memory.used // _MIB,
                    "mig_mode": _mig_mode(nvml, handle),
                }
            )
        return {
            "driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": _cuda_version(nvml.nvmlSystemGetCudaDriverVersion_v2()),
            "gpus": gpus,
        }
    finally:
        nvml.nvmlShutdown()
