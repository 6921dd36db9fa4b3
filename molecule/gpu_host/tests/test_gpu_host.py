"""Air-gapped GPU host preparation: Docker, the NVIDIA driver and the container toolkit
(stand-in packages, see prepare.yml) from local packages, held, with nouveau kept out and
other tools' Docker settings kept."""

from __future__ import annotations

import json

DRIVER = "535.261.03"
HELD = [
    "nvidia-kernel-dkms",
    "nvidia-smi",
    "libcuda1",
    "libnvidia-ml1",
    "nvidia-persistenced",
    "firmware-nvidia-gsp",
]


def test_the_host_has_no_network(host):
    # Loopback and the bridge of its own Docker daemon, and no route out.
    interfaces = set(host.check_output("ls /sys/class/net").split())
    assert interfaces <= {"lo", "docker0"}
    routes = host.file("/proc/net/route").content_string.splitlines()[1:]
    assert not [r for r in routes if r.split()[1] == "00000000"]  # no default route
    assert host.run("getent ahosts deb.debian.org").rc != 0


def test_docker_runs_and_community_docker_can_talk_to_it(host):
    assert host.service("docker").is_running
    assert host.service("docker").is_enabled
    assert host.run("python3 -c 'import docker; docker.from_env().ping()'").rc == 0


def test_daemon_json_keeps_the_keys_another_tool_wrote(host):
    config = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert config["registry-mirrors"] == ["http://mirror.internal.example:5000"]
    assert config["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert config["storage-driver"] == "vfs"
    assert host.check_output("docker info --format '{{.Driver}}'") == "vfs"


TOOLKIT = "1.17.8-1"
TOOLKIT_PACKAGES = [
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
]


def test_the_toolkit_packages_are_pinned_together_and_held(fresh):
    held = fresh.check_output("apt-mark showhold").split()
    for name in TOOLKIT_PACKAGES:
        assert fresh.package(name).version == TOOLKIT, name
        assert name in held, name


def test_the_nvidia_runtime_is_configured_and_other_keys_stay(fresh):
    config = json.loads(fresh.file("/etc/docker/daemon.json").content_string)
    assert config["runtimes"]["nvidia"] == {"args": [], "path": "nvidia-container-runtime"}
    assert "default-runtime" not in config  # nvidia_container_toolkit_default_runtime: false
    # Keys another tool wrote, and the docker_engine role's own, survive nvidia-ctk.
    assert config["registry-mirrors"] == ["http://mirror.internal.example:5000"]
    assert config["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert config["storage-driver"] == "vfs"
    # Docker was restarted to read it.
    runtimes = json.loads(fresh.check_output("docker info --format '{{json .Runtimes}}'"))
    assert "nvidia" in runtimes


def test_nvidia_ctk_would_change_nothing_now(fresh):
    # The role's read-only probe: what it would write is what is there.
    probe = json.loads(fresh.check_output("nvidia-ctk runtime configure --runtime=docker --dry-run"))
    assert probe == json.loads(fresh.file("/etc/docker/daemon.json").content_string)


def test_a_docker_already_installed_is_kept(existing):
    assert existing.package("docker.io").is_installed
    assert not existing.package("docker-ce").is_installed
    assert not existing.file("/etc/apt/sources.list.d/docker.sources").exists
    assert not existing.package("nvidia-smi").is_installed  # cortex_nvidia: false
    assert not existing.package("nvidia-container-toolkit").is_installed


def test_the_driver_is_the_pinned_version_and_held(fresh):
    held = fresh.check_output("apt-mark showhold").split()
    for name in HELD:
        assert name in held
    assert fresh.package("nvidia-kernel-dkms").version.startswith(DRIVER)
    assert fresh.package("nvidia-smi").version.startswith(DRIVER)


def test_nouveau_is_blacklisted(fresh):
    blacklist = fresh.file("/etc/modprobe.d/cortex-blacklist-nouveau.conf").content_string
    assert "blacklist nouveau" in blacklist
    assert "options nouveau modeset=0" in blacklist


def test_the_persistence_daemon_is_enabled(fresh):
    assert fresh.service("nvidia-persistenced").is_enabled


def test_no_nvidia_sources_were_added(fresh):
    # Local packages: the role adds no repository an air-gapped host cannot reach.
    assert not fresh.file("/etc/apt/sources.list.d/cortex-nvidia.sources").exists
