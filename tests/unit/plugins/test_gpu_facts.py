"""gpu_facts' NVML reading, against a stand-in for pynvml."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._gpu_facts import (
    NoDriverError,
    pci_devices,
    read_gpus,
)


class NVMLError(Exception):
    def __init__(self, value: int, text: str = "error") -> None:
        super().__init__(text)
        self.value = value


class FakeNVML:
    """Two GPUs: an L40S without MIG support and an H100 with MIG enabled."""

    NVMLError = NVMLError

    def __init__(self, init_error: int | None = None) -> None:
        self.init_error = init_error
        self.shut_down = False
        self.devices = [
            ("NVIDIA L40S", b"GPU-aaaa", (8, 9), 46068, 45000, None),
            ("NVIDIA H100 80GB HBM3", "GPU-bbbb", (9, 0), 81559, 80000, (1, 1)),
        ]

    def nvmlInit(self):
        if self.init_error is not None:
            raise NVMLError(self.init_error, "NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetName(self, handle):
        return handle[0]

    def nvmlDeviceGetUUID(self, handle):
        return handle[1]

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=b"00000000:00:07.0")

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return handle[2]

    def nvmlDeviceGetMemoryInfo(self, handle):
        total, free = handle[3] * 1024 * 1024, handle[4] * 1024 * 1024
        return SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetMigMode(self, handle):
        if handle[5] is None:
            raise NVMLError(3, "Not Supported")
        return handle[5]

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 13000


def test_reads_every_gpu():
    nvml = FakeNVML()
    facts = read_gpus(nvml)
    assert facts["driver_version"] == "580.159.04"
    assert facts["cuda_driver_version"] == "13.0"
    keys = ("index", "name", "uuid", "compute_capability", "cuda_arch")
    identity = [tuple(g[k] for k in keys) for g in facts["gpus"]]
    assert identity == [
        (0, "NVIDIA L40S", "GPU-aaaa", "8.9", "89"),
        (1, "NVIDIA H100 80GB HBM3", "GPU-bbbb", "9.0", "90"),
    ]
    assert [(g["memory_total_mib"], g["memory_free_mib"], g["memory_used_mib"]) for g in facts["gpus"]] == [
        (46068, 45000, 1068),
        (81559, 80000, 1559),
    ]
    assert [g["mig_mode"] for g in facts["gpus"]] == ["unsupported", "enabled"]
    assert nvml.shut_down


@pytest.mark.parametrize("code", [9, 12])
def test_missing_driver_is_reported_not_raised_as_nvml_error(code):
    with pytest.raises(NoDriverError, match="no NVIDIA driver"):
        read_gpus(FakeNVML(init_error=code))


def test_other_nvml_failures_propagate():
    with pytest.raises(NVMLError):
        read_gpus(FakeNVML(init_error=999))


@pytest.mark.parametrize(("encoded", "version"), [(12040, "12.4"), (13000, "13.0"), (11080, "11.8")])
def test_cuda_version_decoding(encoded, version):
    nvml = FakeNVML()
    nvml.nvmlSystemGetCudaDriverVersion_v2 = lambda: encoded
    assert read_gpus(nvml)["cuda_driver_version"] == version


def test_pci_devices_are_the_nvidia_display_functions_without_a_driver(tmp_path):
    for bus, vendor, klass, device in [
        ("0000:00:06.0", "0x10de", "0x030200", "0x2330"),  # an H100: 3D controller
        ("0000:00:06.1", "0x10de", "0x040300", "0x22a3"),  # its audio function
        ("0000:00:07.0", "0x8086", "0x030000", "0x1234"),  # another vendor's display
        ("0000:00:08.0", "0x10de", "0x030000", "0x26b9"),  # an L40S: VGA controller
    ]:
        folder = tmp_path / bus
        folder.mkdir()
        for name, value in (("vendor", vendor), ("class", klass), ("device", device)):
            (folder / name).write_text(value + "\n")
    assert pci_devices(str(tmp_path)) == [
        {"pci_bus_id": "0000:00:06.0", "device_id": "2330"},
        {"pci_bus_id": "0000:00:08.0", "device_id": "26b9"},
    ]
    assert pci_devices(str(tmp_path / "missing")) == []
