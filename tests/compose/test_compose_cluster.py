"""compose/docker-compose.cluster.yml, the Redis Cluster overlay on docker-compose.yml: six nodes with the ACL
users, a job that forms the cluster, every tokenrelay process on a cluster URL (no Docker engine runs here:
the files are parsed, and the init script forms a real cluster of local redis-server nodes)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from producer.connection import cluster_nodes
from tests.compose.conftest import ROOT
from tests.queue_helpers import wait_for
from worker.redis_cluster import free_cluster_port
from worker.redis_server import RedisServer

BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OVERLAY_PATH = ROOT / "compose" / "docker-compose.cluster.yml"
OVERLAY = yaml.safe_load(OVERLAY_PATH.read_text())
NODES = [f"redis-node-{i}" for i in range(1, 7)]
DEFAULT = re.compile(r"\$\{TOKENRELAY_REDIS_(\w+)_PASSWORD:-([^}]*)\}")


def _merge(base: Any, overlay: Any) -> Any:
    """Compose's merge for what these files use: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in overlay.items()}}
    return overlay


SERVICES = _merge(BASE, OVERLAY)["services"]


def _defaults(text: str) -> str:
    """${TOKENRELAY_REDIS_X_PASSWORD:-default} replaced by the default, as compose does with the variable unset."""
    return DEFAULT.sub(lambda m: m.group(2), text)


def _tokenrelay_urls(name: str) -> list[str]:
    service = SERVICES[name]
    command = service.get("command", [])
    urls = [command[command.index("--redis") + 1]] if "--redis" in command else []
    environment = service.get("environment", {})
    return urls + [
        environment[v] for v in ("TOKENRELAY_REDIS_URL", "TOKENRELAY_MAINTENANCE_REDIS_URL") if v in environment
    ]


def test_six_nodes_like_the_single_redis_with_cluster_mode_and_the_replica_login() -> None:
    single = BASE["services"]["redis"]
    assert set(NODES) | {"redis-cluster-init"} <= set(OVERLAY["services"])
    for name in NODES:
        node = SERVICES[name]
        assert (node["image"], node["entrypoint"], node["healthcheck"]) == (
            single["image"],
            single["entrypoint"],
            single["healthcheck"],
        )
        assert set(single["volumes"][:2]) <= set(node["volumes"])  # compose/redis.conf and the entrypoint
        assert f"{name}-data" in OVERLAY["volumes"] and f"{name}-data:/data" in node["volumes"]
        command = node["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--cluster-announce-hostname") + 1] == name
        assert node["environment"]["REDIS_MASTERUSER"] == "replica"
        passed = {k for k in node["environment"] if k.startswith("TOKENRELAY_REDIS_")}
        assert passed == {
            f"TOKENRELAY_REDIS_{r}_PASSWORD"
            for r in ("PRODUCER", "WORKER", "MAINTENANCE", "CELERY", "ADMIN", "REPLICA")
        }
    for service in OVERLAY["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source  # relative to the project directory, the root


def test_the_init_job_forms_the_cluster_of_exactly_the_node_services() -> None:
    init = SERVICES["redis-cluster-init"]
    listed = init["environment"]["REDIS_CLUSTER_NODES"].split()
    assert listed == [f"{name}:6379" for name in NODES]
    assert len(listed) == 3 * (1 + int(init["environment"]["REDIS_CLUSTER_REPLICAS"]))
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in NODES}
    assert init["restart"] == "no" and init["image"] == BASE["services"]["redis"]["image"]
    script = init["volumes"][0].split(":")
    assert script[1] == init["entrypoint"][-1] and (ROOT / script[0]).is_file()


def test_every_tokenrelay_url_is_a_cluster_url_naming_the_nodes() -> None:
    roles = {
        "worker": "worker",
        "worker-cuda": "worker",
        "gateway": "producer",
        "celery-worker": "producer",
        "celery-beat": "producer",
    }
    for name, role in roles.items():
        urls = _tokenrelay_urls(name)
        assert urls, name
        for url in urls:
            nodes, options = cluster_nodes(_defaults(url))
            assert {host for host, _ in nodes} <= set(NODES) and {port for _, port in nodes} == {6379}, url
            assert options["username"] in (role, "maintenance"), url
        assert SERVICES[name]["depends_on"]["redis-cluster-init"] == {"condition": "service_completed_successfully"}
    for name in ("celery-worker", "celery-beat"):  # kombu speaks no Cluster: the broker stays the plain redis
        environment = SERVICES[name]["environment"]
        assert environment["TOKENRELAY_CELERY_BROKER_URL"].startswith("redis://celery:")
        assert environment["TOKENRELAY_CELERY_BROKER_URL"].split("@")[1].startswith("redis:6379/")
        assert cluster_nodes(_defaults(environment["TOKENRELAY_MAINTENANCE_REDIS_URL"]))[1]["username"] == "maintenance"


def test_default_passwords_match_the_acl_hashes() -> None:
    conf = (ROOT / "compose" / "redis.conf").read_text()
    hashes = dict(re.findall(r"^user (\w+) on #([0-9a-f]{64})", conf, re.MULTILINE))
    text = OVERLAY_PATH.read_text()
    used = set(re.findall(r"redis\+cluster://(\w+):\$\{TOKENRELAY_REDIS_(\w+)_PASSWORD:-([\w-]+)\}@", text))
    assert {role for role, _, _ in used} == {"producer", "worker", "maintenance"}
    used |= {("admin", "ADMIN", d) for d in re.findall(r"TOKENRELAY_REDIS_ADMIN_PASSWORD:-([\w-]+)\}", text)}
    for role, variable, default in used:
        assert variable == role.upper() and hashlib.sha256(default.encode()).hexdigest() == hashes[role]
    assert hashlib.sha256(b"replica-dev").hexdigest() == hashes["replica"]  # the entrypoint's masterauth default


def test_the_entrypoint_logs_nodes_in_to_their_master_without_writing_the_password(tmp_path: Path) -> None:
    argv = tmp_path / "argv"
    fake = tmp_path / "redis-server"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv}\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "REDIS_CONF": str(ROOT / "compose" / "redis.conf"),
        "REDIS_SERVER": str(fake),
        "REDIS_CONF_OUT": str(tmp_path / "rendered.conf"),
        "REDIS_MASTERUSER": "replica",
        "TOKENRELAY_REDIS_REPLICA_PASSWORD": "node secret",
    }
    subprocess.run(
        ["sh", str(ROOT / "compose" / "redis-entrypoint.sh"), "--port", "7000"],
        env=env,
        check=True,
        capture_output=True,
    )
    rendered = (tmp_path / "rendered.conf").read_text()
    assert argv.read_text().splitlines() == [
        str(tmp_path / "rendered.conf"),
        "--masteruser",
        "replica",
        "--masterauth",
        "node secret",
        "--port",
        "7000",
    ]
    assert "node secret" not in rendered
    assert f"user replica on #{hashlib.sha256(b'node secret').hexdigest()} " in rendered


@pytest.fixture
def unformed_nodes() -> Iterator[list[RedisServer]]:
    """Six cluster-enabled nodes on compose/redis.conf, as the compose file starts them, not yet a cluster."""
    args = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--masteruser",
        "replica",
        "--masterauth",
        "replica-dev",
    ]
    servers = [
        RedisServer(
            port=free_cluster_port(),
            extra_args=args,
            config_file=ROOT / "compose" / "redis.conf",
            connection_kwargs={"username": "admin", "password": "admin-dev"},
        )
        for _ in NODES
    ]
    try:
        yield [server.start() for server in servers]
    finally:
        for server in servers:
            server.close()


@pytest.mark.slow
def test_the_init_script_forms_a_cluster_once(unformed_nodes: list[RedisServer]) -> None:
    if shutil.which("redis-cli") is None or shutil.which("getent") is None:
        pytest.skip("needs redis-cli and getent, as in the redis image")
    env = {
        **os.environ,
        "REDIS_CLUSTER_NODES": " ".join(f"127.0.0.1:{s.port}" for s in unformed_nodes),
        "REDIS_CLUSTER_REPLICAS": "1",
        "WAIT_S": "30",
    }
    env.pop("TOKENRELAY_REDIS_ADMIN_PASSWORD", None)  # the development default, as the nodes have it
    script = ["sh", str(ROOT / "compose" / "redis-cluster-init.sh")]
    formed = subprocess.run(script, env=env, capture_output=True, text=True, timeout=180)
    assert formed.returncode == 0, formed.stdout[-2000:] + formed.stderr[-2000:]
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "already knows 6 nodes" in again.stdout, again.stdout + again.stderr
    admins = [redis.Redis(port=s.port, username="admin", password="admin-dev") for s in unformed_nodes]

    def linked() -> bool:  # every slot served, each replica linked to its master as the replica user
        infos = [a.info("replication") for a in admins]
        return all(b"cluster_state:ok" in a.execute_command("CLUSTER", "INFO") for a in admins) and all(
            i.get("master_link_status") == "up" for i in infos if i["role"] == "slave"
        )

    wait_for(linked, 30, 0.1, "cluster ok and replicas linked")
    roles = [a.info("replication")["role"] for a in admins]
    assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
    slots = admins[0].execute_command("CLUSTER", "SLOTS")
    assert sum(end - start + 1 for start, end, *_ in slots) == 16384


def test_compose_config_validates_when_a_client_exists() -> None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run([*command, "version"], capture_output=True).returncode != 0:
            continue
        result = subprocess.run(
            [*command, "-f", str(ROOT / "docker-compose.yml"), "-f", str(OVERLAY_PATH), "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("no docker compose client on this machine")
