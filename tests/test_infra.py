"""infra/: every manifest parses and validates, so a typo fails CI before it fails a deploy.

- Kubernetes core kinds: kubernetes-validate's bundled JSON schemas in strict mode (unknown fields
  are errors), including the pod templates embedded in the KubeRay resources.
- KubeRay RayCluster/RayJob: no pip package ships the KubeRay CRDs, so a focused structural schema
  of the ray.io/v1 fields these manifests use (KubeRay v1.6 API names, unknown fields rejected),
  plus the invariants: token auth from a Secret, autoscaling bounds, RayJob cluster == RayCluster.
- Ray cluster launcher YAML: Ray's own `prepare_config` + `validate_config` (ray-schema.json).
- Compose: structure and invariants (private ports, no committed passwords, postgres + s3).
- Dockerfile: CUDA base matching torch's CUDA build, the `cuda` extra, non-root, telemetry off.
Nothing here needs docker, kubectl or a network.
"""
from __future__ import annotations

import copy
import ipaddress
import re
import string
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_FILES = sorted((INFRA / "kuberay").glob("*.yaml")) + sorted((INFRA / "mlflow" / "k8s").glob("*.yaml"))
LAUNCHER = INFRA / "ray" / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
DOCKERFILE = INFRA / "Dockerfile"
K8S_VERSION = "1.33"          # oldest Kubernetes these manifests are checked against
PLACEHOLDER = "REPLACE_ME"
# Secret keys that hold credentials: their committed values must be placeholders.
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(ROOT)}:{d.get('kind')}/{d['metadata'].get('name') or d['metadata'].get('generateName')}", d)
            for p in K8S_FILES for d in _docs(p)]


def _one(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _raycluster() -> dict:
    return _one(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")


def _rayjob() -> dict:
    return _one(INFRA / "kuberay" / "rayjob.yaml", "RayJob")


def _torch_cuda() -> str:
    """torch.version.cuda of the installed torch, read from torch/version.py (importing torch costs seconds)."""
    text = (Path(find_spec("torch").submodule_search_locations[0]) / "version.py").read_text()
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*'([\d.]+)'", text, re.MULTILINE)
    assert m, "installed torch is not a CUDA build: the image's CUDA base cannot be checked"
    return m.group(1)


# ---- parsing --------------------------------------------------------------------------------

def test_every_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 10, files
    for p in files:
        docs = _docs(p)
        assert docs and all(isinstance(d, dict) for d in docs), p


# ---- Kubernetes core kinds ------------------------------------------------------------------

def _validate_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_core_manifests_validate_strictly():
    core = [(name, d) for name, d in _k8s_docs() if not d["apiVersion"].startswith("ray.io/")]
    kinds = {d["kind"] for _, d in core}
    assert {"Secret", "ConfigMap", "Service", "Deployment", "StatefulSet", "NetworkPolicy",
            "PersistentVolumeClaim", "Namespace"} <= kinds
    for name, doc in core:
        try:
            _validate_k8s(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {e.message} at {'/'.join(map(str, e.path))}")


def test_strict_validation_catches_a_typo():
    deploy = _one(INFRA / "mlflow" / "k8s" / "mlflow.yaml", "Deployment")
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_k8s(bad)


def _pod_templates() -> list[tuple[str, dict]]:
    out = []
    for kind, spec in (("RayCluster", _raycluster()["spec"]), ("RayJob", _rayjob()["spec"]["rayClusterSpec"])):
        out.append((f"{kind} head", spec["headGroupSpec"]["template"]))
        out += [(f"{kind} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    out.append(("RayJob submitter", _rayjob()["spec"]["submitterPodTemplate"]))
    return out


def test_kuberay_pod_templates_validate_as_kubernetes_pod_templates():
    for name, template in _pod_templates():
        # KubeRay fills in the Ray containers' command/args; the rest is a plain PodTemplateSpec.
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            _validate_k8s(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {e.message} at {'/'.join(map(str, e.path))}")


# ---- KubeRay custom resources ---------------------------------------------------------------

_OBJ = {"type": "object"}
_RESOURCES = {"type": "object", "additionalProperties": False,
              "properties": {"requests": _OBJ, "limits": _OBJ}}
_TEMPLATE = {"type": "object", "required": ["spec"], "additionalProperties": False,
             "properties": {"metadata": _OBJ, "spec": _OBJ}}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
# ray.io/v1 fields (KubeRay v1.6 API reference) used by these manifests; anything else is a typo.
RAYCLUSTER_SPEC = {
    "type": "object", "additionalProperties": False,
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {"type": "object", "additionalProperties": False,
                        "properties": {"mode": {"enum": ["disabled", "token"]},
                                       "secretName": {"type": "string"},
                                       "enableK8sTokenAuth": {"type": "boolean"}}},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            "resources": _RESOURCES, "image": {"type": "string"},
            "imagePullPolicy": {"type": "string"}, "securityContext": _OBJ,
            "env": {"type": "array"}, "envFrom": {"type": "array"},
            "volumeMounts": {"type": "array"}, "version": {"enum": ["v1", "v2"]}}},
        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
                          "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                         "enableIngress": {"type": "boolean"},
                                         "rayStartParams": _START_PARAMS, "template": _TEMPLATE,
                                         "headService": _OBJ}},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1},
                           "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                           "numOfHosts": {"type": "integer", "minimum": 1},
                           "suspend": {"type": "boolean"}, "scaleStrategy": _OBJ,
                           "rayStartParams": _START_PARAMS, "template": _TEMPLATE}}},
    },
}
RAYJOB_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["entrypoint", "rayClusterSpec"],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
        "suspend": {"type": "boolean"}, "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
        "submitterPodTemplate": _TEMPLATE, "submitterConfig": _OBJ, "metadata": _OBJ,
        "rayClusterSpec": RAYCLUSTER_SPEC,
    },
}


def _resource(spec_schema: dict, kind: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["namespace"]}, "spec": spec_schema}}


def test_kuberay_resources_match_the_ray_io_v1_fields():
    jsonschema.validate(_raycluster(), _resource(RAYCLUSTER_SPEC, "RayCluster"))
    jsonschema.validate(_rayjob(), _resource(RAYJOB_SPEC, "RayJob"))
    bad = copy.deepcopy(_raycluster())
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3          # the typo a deploy would drop
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _resource(RAYCLUSTER_SPEC, "RayCluster"))


def test_rayjob_runs_on_the_raycluster_spec():
    assert _rayjob()["spec"]["rayClusterSpec"] == _raycluster()["spec"]


def test_ray_token_auth_comes_from_the_example_secret():
    secrets = {d["metadata"]["name"]: d for d in _docs(INFRA / "kuberay" / "secret.example.yaml")}
    for spec in (_raycluster()["spec"], _rayjob()["spec"]["rayClusterSpec"]):
        auth = spec["authOptions"]
        assert auth["mode"] == "token"
        assert "auth_token" in secrets[auth["secretName"]]["stringData"]
    # Every Ray container logs to MLflow with the client Secret (URI and basic-auth user).
    for name, template in _pod_templates()[:-1]:
        for c in template["spec"]["containers"]:
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
            assert refs == ["ldmflow-mlflow-client"], name
            assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"} <= set(secrets[refs[0]]["stringData"])


def test_head_cpu_only_and_worker_groups_autoscale_within_bounds():
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["requests"] == c["resources"]["limits"], g["groupName"]   # Ray counts what it gets
    assert int(groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # One image everywhere, built for torch's CUDA.
    images = {c["image"] for _, t in _pod_templates() for c in t["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f"-cuda{_torch_cuda()}")


def test_rayjob_pipeline_config_loads_with_ldmflow(tmp_path):
    from pipelines.config import load_config

    job = _rayjob()["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    configmap = _one(INFRA / "kuberay" / "pipeline-configmap.yaml", "ConfigMap")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    argv = job["entrypoint"].split()
    assert argv[:3] == ["ldmflow", "run", "/etc/ldmflow/pipeline.yaml"], argv
    assert "--address" in argv
    # The head pod's shell expands $VARS from the mlflow client Secret.
    client = [d for d in _docs(INFRA / "kuberay" / "secret.example.yaml")
              if d["metadata"]["name"] == "ldmflow-mlflow-client"][0]["stringData"]
    overrides = [string.Template(a).substitute(client) for a in argv[3:] if "=" in a]
    cfg = load_config(tmp_path / "pipeline.yaml", overrides)
    assert cfg.tracking.uri == client["MLFLOW_TRACKING_URI"]
    assert cfg.tracking.artifact_location is None    # the server's proxied store, not the head's disk
    assert cfg.output_dir.startswith("/mnt/runs/") and cfg.cluster.use_gpu and cfg.cluster.address == "auto"
    mounts = {m["mountPath"]: m["name"] for m in
              _raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/runs"] == "runs" and mounts["/etc/ldmflow"] == "pipeline"
    assert cfg.cluster.torch_extensions_dir == _dockerfile_env()["TORCH_EXTENSIONS_DIR"]


# ---- Ray cluster launcher -------------------------------------------------------------------

def _launcher_prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = prepare_config(yaml.safe_load(LAUNCHER.read_text()))   # what `ray up` does before any cloud call
    validate_config(cfg)
    return cfg


def test_ray_launcher_config_validates_against_rays_schema():
    cfg = _launcher_prepared()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["use_internal_ips"] is True
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu", "gpu"} and cfg["head_node_type"] == "head"
    for name in ("cpu", "gpu"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= cfg["max_workers"], name
    assert types["head"]["resources"] == {"CPU": 0}
    bad = yaml.safe_load(LAUNCHER.read_text())
    bad["available_node_types"]["gpu"]["max_worker"] = 4
    from ray.autoscaler._private.util import prepare_config, validate_config
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_ray_launcher_nodes_are_private_and_authenticated():
    cfg = _launcher_prepared()
    for name, t in cfg["available_node_types"].items():
        nics = t["node_config"]["NetworkInterfaces"]
        # Own security groups on every node type: Ray's default group would open SSH to 0.0.0.0/0.
        assert all(n["AssociatePublicIpAddress"] is False and n["Groups"] and n["SubnetId"] for n in nics), name
        assert "SecurityGroupIds" not in t["node_config"] and "SubnetIds" not in t["node_config"], name
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    image = cfg["docker"]["image"]
    assert image == _raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert not (INFRA / "ray" / "ldmflow.env").exists() or "ldmflow.env" in (INFRA / "ray" / ".gitignore").read_text()


# ---- MLflow: compose ------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def _compose_defaults(value: str) -> str:
    """A compose value with ${VAR:-default} replaced by its default (unset variables: empty)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_mlflow_uses_postgres_and_s3_with_auth():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "mlflow"}
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for dep in ("postgres", "minio"):
        assert services["mlflow"]["depends_on"][dep]["condition"] == "service_healthy"
    serve = (INFRA / "mlflow" / "serve.sh").read_text()
    for flag in ("--backend-store-uri", "--artifacts-destination", "--serve-artifacts",
                 "--app-name basic-auth", "--allowed-hosts"):
        assert flag in serve, flag
    # The auth database that serve.sh names exists: postgres creates it on first start.
    assert "CREATE DATABASE mlflow_auth" in (INFRA / "mlflow" / "initdb" / "10-auth-database.sql").read_text()
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("/mlflow_auth")
    # basic-auth needs mlflow's `auth` extra (Flask-WTF) and the server needs the postgres driver.
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert "mlflow[auth]" in dockerfile and "psycopg2" in dockerfile and "boto3" in dockerfile


def test_compose_publishes_only_on_private_addresses():
    compose = yaml.safe_load(COMPOSE.read_text())
    example = dict(line.split("=", 1) for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    published = 0
    for name, svc in compose["services"].items():
        assert "network_mode" not in svc, name
        for port in svc.get("ports", []):
            published += 1
            host = _compose_defaults(str(port)).split(":")[0]
            assert host == "127.0.0.1", f"{name}: {port} must default to 127.0.0.1"
            bound = _COMPOSE_VAR.sub(lambda m: example.get(m.group(1), ""), str(port)).split(":")[0]
            assert ipaddress.ip_address(bound).is_private, f"{name}: .env.example binds {bound}"
    assert published == 1     # the MLflow server; postgres and minio stay on the internal network


def test_no_committed_passwords():
    compose_text = COMPOSE.read_text()
    compose = yaml.safe_load(compose_text)
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_KEY.search(key) or "://" in str(value) and "@" in str(value):
                # Credentials only by reference to .env, never literal.
                assert "${" in str(value), f"{name}.{key}"
    for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and SECRET_KEY.search(line.split("=")[0]):
            assert line.split("=", 1)[1] == PLACEHOLDER, line
    for path in (INFRA / "ray" / "ldmflow.env.example",):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#") and SECRET_KEY.search(line.split("=")[0]):
                assert line.split("=", 1)[1] == PLACEHOLDER, line
    for name, doc in _k8s_docs():
        if doc["kind"] == "Secret":
            assert "data" not in doc, name     # stringData only: placeholders stay readable
            for key, value in doc["stringData"].items():
                if SECRET_KEY.search(key):
                    assert PLACEHOLDER in value, f"{name}: {key}"
    for name, _ in (("infra/mlflow/.gitignore", ".env"), ("infra/ray/.gitignore", "ldmflow.env")):
        assert _ in (ROOT / name).read_text().split()


# ---- nothing public -------------------------------------------------------------------------

def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


def test_nothing_public():
    docs = _k8s_docs()
    assert not [n for n, d in docs if d["kind"] in ("Ingress", "Gateway", "HTTPRoute")]
    for name, doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        for where, key, value in _walk(doc):
            assert key not in ("hostPort", "hostNetwork", "nodePort", "externalIPs"), f"{name}{where}"
            if key == "serviceType":
                assert value == "ClusterIP", f"{name}{where}"
            if key == "enableIngress":
                assert value is False, f"{name}{where}"
    # Every MLflow and Ray pod is covered by a NetworkPolicy.
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    selected = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policies}
    assert selected == {"ldmflow-ray", "mlflow", "mlflow-postgres"}
    for path in [COMPOSE, LAUNCHER]:
        assert "0.0.0.0:" not in path.read_text(), path


# ---- Dockerfile -----------------------------------------------------------------------------

def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().split("\nFROM ${RUNTIME_BASE}", 1)[1].replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_dockerfile_cuda_base_matches_torch():
    args = _dockerfile_args()
    cuda = _torch_cuda()
    assert args["CUDA_VERSION"].rsplit(".", 1)[0] == cuda          # 13.0.x for torch's 13.0
    expand = lambda s: s.replace("${CUDA_VERSION}", args["CUDA_VERSION"])  # noqa: E731
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}\.\d+-devel-ubuntu\d+\.\d+", expand(args["BUILD_BASE"]))
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(cuda)}\.\d+-runtime-ubuntu\d+\.\d+", expand(args["RUNTIME_BASE"]))
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms == ["${UV_IMAGE}", "${BUILD_BASE}", "${RUNTIME_BASE}"]
    assert "cu" + cuda.replace(".", "") in DOCKERFILE.read_text()    # torch's CUDA wheels (--torch-backend)


def test_dockerfile_installs_the_cuda_extra_as_non_root():
    text = DOCKERFILE.read_text()
    assert 'extra="[cuda]"' in text and "uv pip install" in text
    assert "uv python install 3.11" in text                        # requires-python = 3.11
    assert "DS_BUILD_FUSED_ADAM=1" in text                          # DeepSpeed's GPU optimizer prebuilt
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    env = _dockerfile_env()
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["TORCH_EXTENSIONS_DIR"].startswith("/opt/")
    assert env["RAY_AUTH_MODE"] == "token"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*" and "!.venv" not in ignore


def test_dockerfile_prebuilds_deepspeeds_cpu_op_into_the_runtime_extensions_dir():
    """The runtime stage has no compiler: the op every CPU DeepSpeed process group loads is built in
    the build stage into the directory the runtime's TORCH_EXTENSIONS_DIR names, and copied over."""
    text = DOCKERFILE.read_text()
    build, runtime = text.split("\nFROM ${RUNTIME_BASE}", 1)
    ext = _dockerfile_env()["TORCH_EXTENSIONS_DIR"]
    assert f"RUN python -m cluster.prebuild {ext}\n" in build
    # after the last DeepSpeed install (the op's build is keyed to the installed sources)
    assert build.index("cluster.prebuild") > build.index("--reinstall-package deepspeed")
    assert f"COPY --from=build --chown=ray:ray {ext} {ext}" in runtime
    assert "build-essential" not in runtime
