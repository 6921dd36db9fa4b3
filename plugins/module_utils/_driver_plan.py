# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which NVIDIA driver packages a host gets, decided in one place.

Plain functions of the platform facts, the GPUs and the role's settings, so
every platform's choice is unit-tested here even where its packages cannot be
fetched. The nvidia_driver role calls them through the `nvidia_driver_plan` filter.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class DriverPlanError(ValueError):
    pass


# Turing (7.5) is the oldest generation the open kernel modules support;
# Blackwell (10.0 and later) is supported only by them.
OPEN_MIN_CC = (7, 5)
OPEN_ONLY_CC = (10, 0)
# From this branch on NVIDIA installs the open modules by default.
OPEN_DEFAULT_BRANCH = 560

PLATFORMS = {
    ("Debian", "12"): "debian",
    ("Ubuntu", "22"): "ubuntu",
    ("Ubuntu", "24"): "ubuntu",
    ("RedHat", "9"): "redhat",
    ("Rocky", "9"): "redhat",
}


def nvidia_wanted(setting, pci_devices):
    """Whether a host gets the NVIDIA stack: cortex_nvidia true, false, or auto (a GPU on its PCI bus)."""
    text = str(setting).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    if text != "auto":
        raise DriverPlanError("cortex_nvidia must be auto, true or false, got %r" % setting)
    return len(pci_devices or []) > 0


def gpus_from_pci(device_ids):
    """GPUs as the plan needs them, from PCI device IDs (before any driver can name them).

    NVIDIA's device IDs grow with the generation: below 0x1E00 is Volta or
    older, from 0x2900 on is Blackwell; in between is Turing to Hopper. The
    compute capability given is the lowest of that range.
    """
    gpus = []
    for device in device_ids:
        number = int(str(device), 16)
        if number < 0x1E00:
            cc = "7.0"
        elif number >= 0x2900:
            cc = "10.0"
        else:
            cc = "7.5"
        gpus.append({"name": "PCI device 10de:%04x" % number, "compute_capability": cc})
    return gpus


def _cc(gpu):
    major, _dot, minor = str(gpu.get("compute_capability", "0.0")).partition(".")
    return (int(major or 0), int(minor or 0))


def choose_modules(setting, branch, gpus):
    """'open' or 'proprietary', and why; refuses a choice the GPUs cannot load."""
    older = [g for g in gpus if _cc(g) < OPEN_MIN_CC]
    newest = [g for g in gpus if _cc(g) >= OPEN_ONLY_CC]
    if older and newest:
        raise DriverPlanError(
            "this host mixes GPUs older than Turing (%s) with Blackwell or newer (%s): no kernel module "
            "flavor drives both" % (older[0].get("name"), newest[0].get("name"))
        )
    if setting == "open" and older:
        raise DriverPlanError(
            "nvidia_driver_kernel_modules is open, but %s (compute capability %s) predates Turing and "
            "needs the proprietary modules" % (older[0].get("name"), older[0].get("compute_capability"))
        )
    if setting == "proprietary" and newest:
        raise DriverPlanError(
            "nvidia_driver_kernel_modules is proprietary, but %s (compute capability %s) is supported by "
            "the open modules only" % (newest[0].get("name"), newest[0].get("compute_capability"))
        )
    if setting in ("open", "proprietary"):
        return setting, "set by nvidia_driver_kernel_modules"
    if setting != "auto":
        raise DriverPlanError(
            "nvidia_driver_kernel_modules must be auto, open or proprietary, got %r" % setting
        )
    if older:
        return "proprietary", "%s predates Turing" % older[0].get("name")
    if gpus:
        return "open", "every GPU is Turing or newer (NVIDIA's recommended modules)"
    if int(branch) >= OPEN_DEFAULT_BRANCH:
        return "open", "no GPU seen; branch %s defaults to the open modules" % branch
    return "proprietary", "no GPU seen; branch %s defaults to the proprietary modules" % branch


def driver_plan(
    distribution, major_version, branch, version, modules="auto", module_source="auto", gpus=None
):
    """The packages to install and hold for one host.

    Returns platform, family (apt or dnf), modules (open or proprietary),
    module_source (dkms or precompiled), packages (with version pins in the
    package manager's syntax), hold (the names to hold) and reasons.
    """
    gpus = gpus or []
    platform = PLATFORMS.get((distribution, str(major_version)))
    if platform is None:
        raise DriverPlanError(
            "%s %s is not a supported platform (Debian 12, Ubuntu 22.04 and 24.04, RHEL or Rocky 9)"
            % (distribution, major_version)
        )
    branch = str(branch)
    if not version.startswith(branch + "."):
        raise DriverPlanError(
            "nvidia_driver_version %s is not on branch %s (nvidia_driver_branch)" % (version, branch)
        )
    flavor, why = choose_modules(modules, branch, gpus)
    if module_source == "auto":
        # Ubuntu ships the modules prebuilt and signed by Canonical: no compiler,
        # no headers, and they load with Secure Boot on.
        module_source = "precompiled" if platform == "ubuntu" else "dkms"
    if module_source == "precompiled" and platform != "ubuntu":
        raise DriverPlanError(
            "precompiled kernel modules exist for Ubuntu only; use dkms on %s" % distribution
        )
    if module_source not in ("dkms", "precompiled"):
        raise DriverPlanError(
            "nvidia_driver_module_source must be auto, dkms or precompiled, got %r" % module_source
        )

    if platform == "debian":
        names = [
            "nvidia-open-kernel-dkms" if flavor == "open" else "nvidia-kernel-dkms",
            "nvidia-smi",
            "libcuda1",
            "libnvidia-ml1",
            "nvidia-persistenced",
            "firmware-nvidia-gsp",
        ]
        # nvidia-persistenced is versioned on its own in Debian, so it is not pinned.
        packages = [n if n == "nvidia-persistenced" else "%s=%s-*" % (n, version) for n in names]
        hold = names
        family = "apt"
    elif platform == "ubuntu":
        suffix = "-server-open" if flavor == "open" else "-server"
        if module_source == "precompiled":
            kernel = [
                "linux-modules-nvidia-%s%s-generic" % (branch, suffix),
                "nvidia-headless-no-dkms-%s%s" % (branch, suffix),
            ]
        else:
            kernel = ["nvidia-dkms-%s%s" % (branch, suffix), "nvidia-headless-%s%s" % (branch, suffix)]
        names = kernel + ["nvidia-utils-%s-server" % branch, "libnvidia-compute-%s-server" % branch]  # noqa: RUF005
        # The linux-modules metapackage follows the kernel's version, not the driver's.
        packages = [n if n.startswith("linux-modules-") else "%s=%s-*" % (n, version) for n in names]
        hold = names
        family = "apt"
    else:
        stream = "%s-open" % branch if flavor == "open" else "%s-dkms" % branch
        kmod = "kmod-nvidia-open-dkms" if flavor == "open" else "kmod-nvidia-latest-dkms"
        names = ["nvidia-driver", "nvidia-driver-cuda", "nvidia-persistenced", kmod]
        packages = ["@nvidia-driver:%s" % stream] + ["%s-%s" % (n, version) for n in names]
        hold = ["%s-%s" % (n, version) for n in names]
        family = "dnf"
    return {
        "platform": platform,
        "family": family,
        "modules": flavor,
        "module_source": module_source,
        "packages": packages,
        "hold": hold,
        "reasons": [why],
    }


def version_mismatch(nvidia_smi_output):
    """The driver/library mismatch message of nvidia-smi, made into advice; None if there is none."""
    if "Driver/library version mismatch" not in nvidia_smi_output:
        return None
    return (
        "the NVIDIA kernel module that is loaded is not the version of the installed libraries "
        "(nvidia-smi: Driver/library version mismatch). The driver was upgraded but the old module is "
        "still in the kernel: reboot the host (or stop every GPU process and run "
        "'modprobe -r nvidia_uvm nvidia_drm nvidia_modeset nvidia && modprobe nvidia')."
    )


TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)


def toolkit_packages(version, family):
    """The four toolkit packages, pinned together in the package manager's syntax."""
    if family == "apt":
        pinned = ["%s=%s-1" % (name, version) for name in TOOLKIT_PACKAGES]
    elif family == "dnf":
        pinned = ["%s-%s-1" % (name, version) for name in TOOLKIT_PACKAGES]
    else:
        raise DriverPlanError("unknown package manager %r" % family)
    return {"names": list(TOOLKIT_PACKAGES), "pinned": pinned}
