"""docker-compose.yml and compose/: the services, files and passwords fit together (no Docker engine runs here)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import pytest
import yaml

from tests.compose.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_the_services_and_their_files() -> None:
    assert set(SERVICES) == {"redis", "worker", "worker-cuda", "gateway", "celery-worker", "celery-beat", "prometheus"}
    for service in SERVICES.values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source
    assert SERVICES["worker-cuda"]["profiles"] == ["cuda"]


def test_workers_scale_and_are_scraped() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N needs both absent
    entrypoint = (ROOT / "compose" / "Dockerfile.worker-cpu").read_text()
    port = re.search(r'"--metrics-port", "(\d+)"', entrypoint)
    assert port is not None and port.group(1) in worker["expose"]
    prometheus = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    discovery = jobs["tokenrelay-worker"]["dns_sd_configs"][0]
    assert (discovery["names"], discovery["type"], discovery["port"]) == (["worker"], "A", int(port.group(1)))
    assert jobs["tokenrelay-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]


def test_the_producer_image_has_no_torch() -> None:
    dockerfile = (ROOT / "compose" / "Dockerfile.gateway").read_text()
    assert "[engine" not in dockerfile and "torch' not in sys.modules" in dockerfile
    for name in ("gateway", "celery-worker", "celery-beat"):
        assert SERVICES[name].get("image") == "tokenrelay-gateway"


def test_default_passwords_match_the_acl_hashes() -> None:
    """Each client URL's development default is the password whose hash compose/redis.conf holds."""
    conf = (ROOT / "compose" / "redis.conf").read_text()
    hashes = dict(re.findall(r"^user (\w+) on #([0-9a-f]{64})", conf, re.MULTILINE))
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"redis://(\w+):\$\{TOKENRELAY_REDIS_(\w+)_PASSWORD:-([\w-]+)\}@redis", text))
    assert {role for role, _, _ in used} == {"producer", "worker", "celery", "maintenance"}
    for role, variable, default in used:
        assert variable == role.upper() and hashlib.sha256(default.encode()).hexdigest() == hashes[role]
    assert "admin" in hashes and "user default off" in conf
    assert not re.search(r"^user .* >\S", conf, re.MULTILINE)  # no clear-text password rule (`>password`)


def test_compose_config_validates_when_a_client_exists() -> None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run([*command, "version"], capture_output=True).returncode != 0:
            continue  # `docker` without the compose plugin
        result = subprocess.run(
            [*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("no docker compose client on this machine")
