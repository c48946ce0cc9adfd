"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the services, the
commands they run (which must exist in this project), the volumes for runs/ and certs/."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _words(service: dict) -> list[str]:
    cmd = service["command"]
    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


def test_compose_has_server_and_two_clients_from_the_dockerfile():
    services = _compose()["services"]
    assert {"server", "client1", "client2"} <= set(services)
    for name in ("server", "client1", "client2", "setup"):
        service = services[name]
        assert service["build"]["dockerfile"] == "Dockerfile" and service["build"]["context"] == "."
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {"/work/runs", "/work/certs"} <= mounts
    assert services["server"]["ports"] == ["9092:9092"]


def test_compose_commands_exist_and_fit_together():
    services = _compose()["services"]
    scripts = _scripts()
    setup = " ".join(_words(services["setup"]))
    assert "fedlora certs --out certs --server-host server" in setup
    server = _words(services["server"])
    assert server[0] == "sh" and server[2].split()[0] in scripts
    # $$(date ...) is compose's escape for the shell's $(date ...): a time-stamped run directory.
    server_args = shlex.split(re.sub(r"\$\$\([^)]*\)", "STAMP", server[2]))
    assert server_args[0] == "fedlora-server" and "--certs" in server_args and "--auth-keys" in server_args
    port = server_args[server_args.index("--port") + 1]
    from fedlora.cli.deploy import _client_parser, _server_parser

    _server_parser().parse_args(server_args[1:])  # every flag is one fedlora-server has
    for name in ("client1", "client2"):
        words = _words(services[name])
        assert words[0] == "fedlora-client" and words[0] in scripts
        args = _client_parser().parse_args(words[1:])
        assert args.server == f"server:{port}" and args.ca == "certs/ca.crt" and args.key.startswith("certs/nodes/")
        assert args.data.startswith("data/client")
        assert services[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"


def test_gpu_override_builds_cuda_torch_and_reserves_gpus():
    gpu = _compose("docker-compose.gpu.yml")["services"]
    for name in ("client1", "client2"):
        assert "cu" in gpu[name]["build"]["args"]["TORCH_INDEX"]
        assert gpu[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfile_installs_pinned_torch_then_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.M)
    assert "ARG TORCH_VERSION=2.13.0" in text and "whl/cpu" in text
    assert text.index("torch==") < text.index('pip install ".[quickstart]"')
    for folder in ("fedlora", "server", "client", "strategies", "simulations"):
        assert f"COPY {folder} ./{folder}" in text and (ROOT / folder).is_dir()
    assert "EXPOSE 9092" in text
