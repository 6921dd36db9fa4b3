"""The NVIDIA driver plan on every supported platform, also those whose packages can't be fetched here."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._driver_plan import (
    DriverPlanError,
    driver_plan,
    gpus_from_pci,
    nvidia_wanted,
    toolkit_packages,
    version_mismatch,
)

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
L40S = {"name": "NVIDIA L40S", "compute_capability": "8.9"}
V100 = {"name": "Tesla V100-SXM2-32GB", "compute_capability": "7.0"}
B200 = {"name": "NVIDIA B200", "compute_capability": "10.0"}


def test_debian_gets_dkms_packages_pinned_and_held():
    plan = driver_plan("Debian", "12", "535", "535.261.03", gpus=[L40S])
    assert (plan["family"], plan["modules"], plan["module_source"]) == ("apt", "open", "dkms")
    assert plan["packages"][0] == "nvidia-open-kernel-dkms=535.261.03-*"
    assert "nvidia-smi=535.261.03-*" in plan["packages"]
    assert "nvidia-persistenced" in plan["packages"]  # versioned on its own in Debian
    assert "nvidia-open-kernel-dkms" in plan["hold"]


def test_ubuntu_takes_canonicals_precompiled_signed_modules():
    plan = driver_plan("Ubuntu", "24", "570", "570.195.03", gpus=[H100])
    assert plan["module_source"] == "precompiled"
    assert plan["packages"][:2] == [
        "linux-modules-nvidia-570-server-open-generic",
        "nvidia-headless-no-dkms-570-server-open=570.195.03-*",
    ]
    dkms = driver_plan("Ubuntu", "22", "535", "535.261.03", "proprietary", "dkms", [L40S])
    assert dkms["packages"][:2] == [
        "nvidia-dkms-535-server=535.261.03-*",
        "nvidia-headless-535-server=535.261.03-*",
    ]


def test_rhel_and_rocky_use_the_module_stream_and_versionlock():
    for distribution in ("RedHat", "Rocky"):
        plan = driver_plan(distribution, "9", "570", "570.195.03", gpus=[H100])
        assert plan["family"] == "dnf"
        assert plan["packages"][0] == "@nvidia-driver:570-open"
        assert "kmod-nvidia-open-dkms-570.195.03" in plan["hold"]
    proprietary = driver_plan("Rocky", "9", "535", "535.261.03", "proprietary", gpus=[V100])
    assert proprietary["packages"][0] == "@nvidia-driver:535-dkms"


@pytest.mark.parametrize(
    ("modules", "branch", "gpus", "expected"),
    [
        ("auto", "535", [V100], "proprietary"),
        ("auto", "535", [L40S, H100], "open"),
        ("auto", "535", [], "proprietary"),
        ("auto", "570", [], "open"),
        ("proprietary", "570", [H100], "proprietary"),
    ],
)
def test_module_flavor_follows_the_gpu_generation_unless_set(modules, branch, gpus, expected):
    assert driver_plan("Debian", "12", branch, branch + ".1", modules, gpus=gpus)["modules"] == expected


DEBIAN = ("Debian", "12")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((*DEBIAN, "535", "535.1", "open", "auto", [V100]), "V100-SXM2-32GB (compute capability 7.0)"),
        ((*DEBIAN, "570", "570.1", "proprietary", "auto", [B200]), "B200 (compute capability 10.0) is"),
        ((*DEBIAN, "570", "570.1", "auto", "auto", [V100, B200]), "mixes GPUs older than Turing"),
        ((*DEBIAN, "535", "550.1"), "550.1 is not on branch 535"),
        ((*DEBIAN, "535", "535.1", "auto", "precompiled"), "precompiled kernel modules exist for Ubuntu"),
        (("Debian", "11", "535", "535.1"), "Debian 11 is not a supported platform"),
        ((*DEBIAN, "535", "535.1", "closed"), "must be auto, open or proprietary, got 'closed'"),
    ],
)  # fmt: skip
def test_impossible_choices_are_refused_with_the_reason(args, message):
    with pytest.raises(DriverPlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        driver_plan(*args)


def test_a_version_mismatch_becomes_advice():
    output = "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.261"
    assert "reboot the host" in version_mismatch(output)
    assert version_mismatch("| NVIDIA-SMI 535.261.03 |") is None


def test_pci_ids_tell_the_generation_before_a_driver_is_loaded():
    # V100, T4, L40S, H100, B200
    gpus = gpus_from_pci(["1db4", "1eb8", "26b9", "2330", "2901"])
    assert [g["compute_capability"] for g in gpus] == ["7.0", "7.5", "7.5", "7.5", "10.0"]
    assert driver_plan(*DEBIAN, "570", "570.1", gpus=gpus[1:4])["modules"] == "open"
    assert driver_plan(*DEBIAN, "535", "535.1", gpus=gpus[:1])["modules"] == "proprietary"


def test_the_four_toolkit_packages_are_pinned_together():
    apt = toolkit_packages("1.17.8", "apt")
    assert apt["pinned"] == [
        "nvidia-container-toolkit=1.17.8-1",
        "nvidia-container-toolkit-base=1.17.8-1",
        "libnvidia-container-tools=1.17.8-1",
        "libnvidia-container1=1.17.8-1",
    ]
    assert toolkit_packages("1.17.8", "dnf")["pinned"][3] == "libnvidia-container1-1.17.8-1"
    with pytest.raises(DriverPlanError, match="unknown package manager 'zypper'"):
        toolkit_packages("1.17.8", "zypper")


def test_the_nvidia_stack_goes_where_a_gpu_is_unless_told():
    h100 = [{"pci_bus_id": "0000:00:06.0", "device_id": "2330"}]
    assert nvidia_wanted("auto", h100) is True
    assert nvidia_wanted("auto", []) is False
    assert nvidia_wanted(True, []) is True
    assert nvidia_wanted("false", h100) is False
    with pytest.raises(DriverPlanError, match="cortex_nvidia must be auto, true or false, got 'sometimes'"):
        nvidia_wanted("sometimes", [])
