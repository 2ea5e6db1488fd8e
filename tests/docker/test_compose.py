"""docker-compose.yml and docker/, checked without a Docker engine: services, ports, volumes, profiles, and
that every command, module, setting and file they name exists (or is in docker/allowlist.yml's pending)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from ops_files import COMPOSE, DASHBOARDS, GRAFANA, REPO, WORKER_MODULE, allowlist, compose, load_yaml

from service.settings import Settings

CERTSERVE = ("api", "workers", "api-cpu", "workers-cpu")
GPU_SERVICES = ("api", "workers")
CPU_SERVICES = ("api-cpu", "workers-cpu")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def module_file(module: str) -> Path | None:
    """The file ``python -m module`` runs, or None if there is none."""
    base = REPO / module.replace(".", "/")
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (host paths starting with ./)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts.append((REPO / source, target))
    return mounts


def in_container(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path of ``service`` comes from through a bind mount."""
    for host, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return host / container_path[len(target) :].lstrip("/")
    return None


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*CERTSERVE, "redis", "cache", "prometheus", "grafana"}


def test_gpu_and_cpu_profiles(services: dict[str, dict[str, Any]]) -> None:
    for name in GPU_SERVICES:
        assert services[name]["profiles"] == ["gpu"]
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in CPU_SERVICES:
        assert services[name]["profiles"] == ["cpu"]
        assert "resources" not in services[name].get("deploy", {}), f"{name} must run without a GPU"
    # The CPU services answer to the GPU services' names, so that one scrape config serves both profiles.
    assert services["api-cpu"]["networks"]["default"]["aliases"] == ["api"]
    assert services["workers-cpu"]["networks"]["default"]["aliases"] == ["workers"]
    assert services["workers-cpu"]["deploy"]["replicas"] >= 2
    for name in ("redis", "cache", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} runs in every profile"


def test_images_are_built_from_the_dockerfile_in_both_variants(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = (REPO / services["api"]["build"]["dockerfile"]).read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, flags=re.M))
    variants = {services[n]["build"]["args"]["VARIANT"] for n in ("api", "api-cpu")}
    assert variants == {"cpu", "cuda"} and {f"torch-{v}" for v in variants} <= stages
    assert re.search(r"^FROM torch-\$\{VARIANT\} AS app", dockerfile, flags=re.M)
    assert services["api"]["build"]["context"] == "."
    # The workers run the image their API builds.
    assert services["workers"]["image"] == services["api"]["image"]
    assert services["workers-cpu"]["image"] == services["api-cpu"]["image"]


def test_the_dockerfile_runs_as_a_user_checks_liveness_and_bakes_in_the_checkpoints(
    services: dict[str, dict[str, Any]],
) -> None:
    text = (REPO / services["api"]["build"]["dockerfile"]).read_text()
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    healthcheck = re.search(r"^HEALTHCHECK .*?(?=^\S)", text, flags=re.M | re.S)
    assert healthcheck and "/healthz" in healthcheck.group() and "/readyz" not in healthcheck.group()
    assert re.search(r"^COPY checkpoints ", text, flags=re.M)
    assert 'CMD ["python", "-m", "service"]' in text


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context(
    services: dict[str, dict[str, Any]],
) -> None:
    text = (REPO / services["api"]["build"]["dockerfile"]).read_text()
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]

    def in_context(path: str) -> bool:
        included = True
        for rule in rules:  # the last matching rule decides, as for Docker
            negated = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                included = negated
        return included

    sources = [s for line in re.findall(r"^COPY (.+)$", text, flags=re.M) for s in line.split()[:-1]]
    assert "checkpoints" in sources and "service" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert in_context(source), f"{source} is excluded from the build context by .dockerignore"
    assert not in_context(".venv") and not in_context("state")


def test_every_command_names_a_module_that_exists_or_is_pending(services: dict[str, dict[str, Any]]) -> None:
    pending = allowlist()["pending"]["modules"]
    for name in CERTSERVE:
        command = services[name]["command"]
        assert command[:2] == ["python", "-m"], command
        module = command[2]
        assert module_file(module) is not None or module in pending, f"{name}: no module {module}"
    assert services["api"]["command"] == services["api-cpu"]["command"] == ["python", "-m", "service"]
    assert services["workers"]["command"] == services["workers-cpu"]["command"] == ["python", "-m", WORKER_MODULE]


def test_every_setting_is_a_setting_of_the_service_or_pending(services: dict[str, dict[str, Any]]) -> None:
    known = {f"CERTSERVE_{field.upper()}" for field in Settings.model_fields}
    pending = set(allowlist()["pending"]["settings"])
    for name in CERTSERVE:
        environment = services[name]["environment"]
        for variable in environment:
            assert variable in known | pending, f"{name}: {variable} is no setting"
        Settings(**{k.removeprefix("CERTSERVE_").lower(): v for k, v in environment.items() if k in known})


def test_redis_urls_point_at_the_redis_services(services: dict[str, dict[str, Any]]) -> None:
    environment = services["api"]["environment"]
    jobs, cache = urlparse(environment["CERTSERVE_REDIS_URL"]), urlparse(environment["CERTSERVE_CACHE_REDIS_URL"])
    assert (jobs.hostname, jobs.port) == ("redis", 6379) and (cache.hostname, cache.port) == ("cache", 6379)
    # Jobs and the broker: never evicted, persisted. The cache: evicted least-recently-used under a memory cap.
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command and "--appendonly yes" in redis_command
    cache_command = " ".join(services["cache"]["command"])
    assert "--maxmemory-policy allkeys-lru" in cache_command and re.search(r"--maxmemory \d+", cache_command)
    for name in CERTSERVE:
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == depends["cache"]["condition"] == "service_healthy", name


def test_ports_and_named_volumes(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["ports"] == services["api-cpu"]["ports"] == ["8000:8000"]
    assert services["prometheus"]["ports"] == ["9090:9090"] and services["grafana"]["ports"] == ["3000:3000"]
    declared = set(compose()["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_reads_the_repos_config_and_rules_and_scrapes_the_services(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_file = in_container(prometheus, flags["config.file"])
    assert config_file is not None and config_file.is_file()
    config = load_yaml(config_file)
    for rule_file in config["rule_files"]:
        assert (config_file.parent / rule_file).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_port = services["api"]["environment"]["CERTSERVE_PORT"]
    assert jobs["certserve-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    (discovery,) = jobs["certserve-workers"]["dns_sd_configs"]
    assert discovery["names"] == ["workers"] and discovery["type"] == "A"
    assert str(discovery["port"]) == services["workers"]["environment"]["CERTSERVE_WORKER_METRICS_PORT"]
    assert f":{discovery['port']}/metrics" in " ".join(services["workers"]["healthcheck"]["test"])


def test_grafana_provisioning_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    provisioning = in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA / "provisioning"
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlparse(source["url"])
    assert url.hostname in services and url.port == int(services["prometheus"]["ports"][0].split(":")[1])
    (provider,) = load_yaml(provisioning / "dashboards" / "certserve.yml")["providers"]
    dashboards = in_container(grafana, provider["options"]["path"])
    assert dashboards == DASHBOARDS and list(dashboards.glob("*.json"))
    home = in_container(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file()


def test_the_readme_starts_the_stack_as_the_compose_file_says() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docker compose --profile cpu up --build" in readme
    assert "docker compose --profile gpu up --build" in readme
    assert COMPOSE.name in readme
