"""The Helm chart and the Dockerfiles, checked offline: helm 3 and 4 lint/template, core objects
against Kubernetes schemas, KubeRay objects strictly against the CRDs, serveConfigV2 against Ray
Serve's own schema, the values schema against bad values, hadolint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "oneword"
PRODUCTION = CHART / "ci" / "production-values.yaml"
CRDS = ROOT / "tests" / "kuberay-crds"  # unmodified KubeRay v1.7 CRDs (Apache-2.0), see its README
TOOLS = ROOT / ".tools"
HELMS = {"helm3": TOOLS / "helm3", "helm4": TOOLS / "helm4"}
VENV_BIN = Path(sys.executable).parent


def helm(binary: str, *args: str) -> subprocess.CompletedProcess:
    path = HELMS[binary]
    assert path.is_file(), f"{path} missing: run `bash setup.sh --dev`"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def render(values: Path | None = None, binary: str = "helm4", *sets: str) -> list[dict]:
    args = ["template", "rel", str(CHART)] + (["-f", str(values)] if values else [])
    for item in sets:
        args += ["--set", item]
    result = helm(binary, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def closed(schema):
    """The CRD schema with every object that lists properties closed, as strict field
    validation treats it (see ../shared/kuberay-crds/README.md)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str) -> dict:
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}  # fmt: skip
    crd = yaml.safe_load((CRDS / files[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return closed(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("binary", ["helm3", "helm4"])
@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["defaults", "production"])
def test_helm_lint_and_template(binary, values):
    args = ["lint", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(binary, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted(doc["kind"] for doc in render(values, binary))
    expected = ["NetworkPolicy", "PodDisruptionBudget", "Pod", "RayCluster", "RayService", "Service", "ServiceAccount"]
    if values == PRODUCTION:
        expected += ["ConfigMap", "Ingress", "RayJob"]
    assert kinds == sorted(expected)


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["defaults", "production"])
def test_rendered_objects_validate(values, tmp_path):
    docs = render(values)
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "-k", "1.37.0", "--strict", str(manifest)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rays = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert rays
    for doc in rays:
        jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_try_out_minio_renders_valid_and_off_by_default(tmp_path):
    assert not any(d["kind"] == "Deployment" for d in render())
    docs = [d for d in render(None, "helm4", "minio.enabled=true") if "minio" in d["metadata"]["name"]]
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    manifest = tmp_path / "minio.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "-k", "1.37.0", "--strict", str(manifest)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [container] = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    assert all("valueFrom" in env for env in container["env"])  # root credentials from the Secret


def test_crd_validation_is_strict():
    [service] = [d for d in render() if d["kind"] == "RayService"]
    service["spec"]["serveConfigV3"] = "typo"
    with pytest.raises(jsonschema.ValidationError, match="serveConfigV3"):
        jsonschema.validate(service, crd_schema("RayService"))


def test_serve_config_and_job_entrypoint_are_the_projects_real_ones():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.settings import ServeSettings

    docs = render(PRODUCTION)
    [service] = [d for d in docs if d["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema(**config)
    [application] = config["applications"]
    args = application["args"]
    assert application["import_path"] == "serving.app:build_app"
    assert (args["num_gpus"], args["min_replicas"], args["max_replicas"]) == (0.25, 2, 16)
    assert args["api_keys_file"] == "/etc/oneword/api-keys/keys"
    assert build_app(args)._bound_deployment.name == "oneword-generator"
    # the proxy's idle and request timeouts are the ones the settings imply (ServeSettings.http_options)
    assert config["http_options"] == ServeSettings(**args).http_options("0.0.0.0", 8000)

    [job] = [d for d in docs if d["kind"] == "RayJob"]
    module, command, path = job["spec"]["entrypoint"].split()[2:5]
    assert (module, command) == ("pipeline.cli", "run-job")
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    from pipeline.jobs.spec import parse_job_spec

    spec = parse_job_spec(configmap["data"][Path(path).name], "configmap")
    assert spec.job == "pets-2026-11"
    help_text = subprocess.run([sys.executable, "-m", "pipeline.cli", "run-job", "--help"], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
    assert help_text.returncode == 0 and "manifest" in help_text.stdout


def test_security_defaults():
    docs = render()
    for doc in docs:
        for template in _pod_templates(doc):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["resources"]["limits"]
                for env in container.get("env", []):  # credentials only by reference
                    if "KEY" in env["name"] or "SECRET" in env["name"]:
                        assert "valueFrom" in env and "value" not in env
    for kind in ("RayCluster", "RayService"):
        [doc] = [d for d in docs if d["kind"] == kind]
        cluster = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterConfig"]
        assert cluster["authOptions"] == {"mode": "token", "secretName": "oneword-ray-token"}
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    open_ports = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert open_ports == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]


def test_chart_never_serves_an_open_api_unless_told():
    """Without an API key Secret the chart refuses to render; allowAnonymous renders an open service
    and says so in the app's settings (the replica refuses to start open otherwise)."""
    refused = helm("helm4", "template", "rel", str(CHART), "--set", "serving.apiKeysSecret=")
    assert refused.returncode != 0 and "serving.allowAnonymous" in refused.stderr, refused.stderr
    for sets, expected in ((("serving.apiKeysSecret=", "serving.allowAnonymous=true"), {"allow_anonymous": True}),
                           ((), {"api_keys_file": "/etc/oneword/api-keys/keys"})):  # fmt: skip
        [service] = [d for d in render(None, "helm4", *sets) if d["kind"] == "RayService"]
        [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert expected.items() <= app["args"].items()
        assert len({"allow_anonymous", "api_keys_file"} & set(app["args"])) == 1


def test_monitoring_is_off_by_default_and_renders_valid_objects_when_on():
    """PodMonitor validated against the Prometheus Operator's own types (cloudcoil's models of its
    CRDs, closed like the KubeRay CRDs); the dashboard ConfigMap carries the generated dashboard for
    Grafana's sidecar; the NetworkPolicy opens the metrics port to Prometheus's namespace only."""
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    kinds = {d["kind"] for d in render()}
    assert "PodMonitor" not in kinds and "ConfigMap" not in kinds
    docs = render(None, "helm4", "monitoring.podMonitor.enabled=true", "monitoring.grafanaDashboard.enabled=true",
                  "monitoring.prometheusNamespace=monitoring", "monitoring.podMonitor.labels.release=prom")  # fmt: skip
    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    jsonschema.validate(monitor, closed(PodMonitor.model_json_schema(by_alias=True)))
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    [dashboard] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["oneword.json"]) == json.loads(
        (CHART / "dashboards" / "oneword.json").read_text()
    )
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]} in policy["spec"]["ingress"]  # fmt: skip
    bad = helm("helm4", "template", "rel", str(CHART), "--set", "monitoring.podMonitor.interval=often")
    assert bad.returncode != 0 and "pattern" in bad.stderr


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    cluster = (
        spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or (spec if doc["kind"] == "RayCluster" else None)
    )
    if doc["kind"] == "Pod":
        return [doc]
    if not cluster:
        return []
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("serving.replicas.min=-1", "minimum"),
        ("serving.gpuPerReplica=9", "maximum"),
        ("objectStorage.registry=/local/path", "pattern"),
        ("objectStorage.endpoint=minio:9000", "pattern"),
        ("serving.service.type=Internal", "value must be one of"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
        ("serving.unknownField=1", "additional properties"),
        ("ray.version=latest", "pattern"),
        # the free-form blocks' schemas come from the pydantic models (deploy/helm/generate.py)
        ("serving.settings.max_imagez=3", "additional properties 'max_imagez'"),
        ("serving.settings.max_images=99", "maximum"),
        ("training.job.manifest.job=pets", "missing properties 'base_model'"),
    ],
)
def test_values_schema_rejects_bad_values(setting, message):
    result = helm("helm4", "template", "rel", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert message.lower() in result.stderr.lower(), result.stderr


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted((ROOT / "dockerfiles").glob("Dockerfile*"))
    assert [p.name for p in dockerfiles] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or str(VENV_BIN / "hadolint")
    result = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in dockerfiles:
        text = path.read_text()
        assert "FROM rayproject/ray:2.60.0-py311-" in text and "USER 1000" in text


def test_generated_chart_parts_match_the_models():
    """values.schema.json's serving.settings and training.job.manifest, and README.md's values table,
    are what deploy/helm/generate.py makes from the pydantic models and values.yaml now."""
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "helm" / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    for key in ("serving.settings", "training.job.manifest", "objectStorage.existingSecret"):
        assert f"| `{key}` |" in readme


def test_a_valid_manifest_in_values_passes_the_chart_schema(tmp_path):
    manifest = {
        "job": "pets",
        "base_model": "s3://m/sd15/",
        "registry": "s3://c/r",
        "checkpoint_storage": "s3://c/k",
        "recipe": "sd15-object",
        "concepts": [{"name": "my-dog", "images": "s3://p/dog/", "class_word": "dog"}],
    }
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"training": {"job": {"enabled": True, "manifest": manifest}}}))
    result = helm("helm4", "template", "rel", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stderr
