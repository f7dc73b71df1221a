"""The Helm chart (deploy/helm/wattson): lints, renders, and every object it renders is valid and does what
docs/kubernetes.md says.

Offline, without a cluster or the helm binary: Helm itself runs in-process through helm-python-sdk (the Helm
v4 Go SDK as a shared library), Kubernetes objects are checked against the Kubernetes 1.30 OpenAPI schemas
bundled with kubernetes-validate in strict mode (unknown fields are errors), and the prometheus-operator
objects against the CRD schemas kept in deploy/helm/crds-schemas, made strict the same way. The rendered
wattson configs go through wattson's own config loader. One integration test scrapes a fake wattson with a
real Prometheus using the monitors' relabelings, to show what the labels become.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import find_tool, in_ci, require_tool


def require_module(name: str, package: str) -> ModuleType:
    """A test dependency from the test extras: skipped without it, except under CI=true, where it fails."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if in_ci():
            raise
        pytest.skip(f"{package} not installed (pip install -e '.[test]')", allow_module_level=True)


helm = require_module("helm_python", "helm-python-sdk")
kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
HELM_DIR = ROOT / "deploy" / "helm"
CHART = HELM_DIR / "wattson"
CRD_SCHEMAS = HELM_DIR / "crds-schemas"
RULES = ROOT / "prometheus" / "rules"
DASHBOARDS = ROOT / "grafana" / "dashboards"
KUBE_VERSION = "1.30"
RELEASE = "wattson"
NAMESPACE = "monitoring"
POD_RESOURCES = "/var/lib/kubelet/pod-resources"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

# Every optional object and setting on at once.
EVERYTHING: dict[str, Any] = {
    "image": {"repository": "registry.example.net/wattson", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccount": {"annotations": {"example.net/owner": "gpu-team"}},
    "runtimeClassName": "nvidia",
    "priorityClassName": "system-node-critical",
    "existingSecret": "wattson-keys",
    "existingSecretEnv": {"ELECTRICITYMAPS_API_KEY": "electricitymaps", "WATTSON_HUB_PASSWORD": "hub"},
    "webConfig": {"existingSecret": "wattson-web", "tls": True},
    "extraArgs": ["--log.level=debug"],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "extraVolumes": [{"name": "hub-ca", "secret": {"secretName": "hub-ca"}}],
    "extraVolumeMounts": [{"name": "hub-ca", "mountPath": "/etc/wattson/hub-ca", "readOnly": True}],
    "hostPID": True,
    "podAnnotations": {"example.net/team": "gpu"},
    "podLabels": {"team": "gpu"},
    "podSecurityContext": {"supplementalGroups": [44]},
    "config": {"workloads": {"enabled": True}, "budgets": {"currency": "EUR", "cost_per_month": 5000}},
    "service": {"internalTrafficPolicy": "Local", "annotations": {"example.net/a": "b"}},
    "serviceMonitor": {
        "enabled": True, "labels": {"release": "kube-prometheus-stack"}, "scheme": "https",
        "tlsConfig": {"ca": {"secret": {"name": "wattson-ca", "key": "ca.crt"}}, "serverName": "wattson"},
        "basicAuth": {"username": {"name": "wattson-scrape", "key": "username"},
                      "password": {"name": "wattson-scrape", "key": "password"}},
        "relabelings": [{"targetLabel": "cluster", "replacement": "gpu-east"}],
        "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "wattson_sampler_.*", "action": "drop"}]},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "30s",
                   "scrapeTimeout": "20s"},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True, "folder": "wattson", "datasourceUid": "prometheus"},
    "hub": {"enabled": True, "existingSecret": "wattson-hub-keys",
            "webConfig": {"existingSecret": "wattson-hub-web"},
            "persistence": {"existingClaim": "wattson-hub-state"},
            "extraEnv": [{"name": "TZ", "value": "UTC"}]},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": EVERYTHING,
    # the Secret's keys as variables (envFrom), the hub without a mapping either, no init container
    "envFrom": {"existingSecret": "wattson-keys", "hub": {"enabled": True, "existingSecret": "hub-keys"},
                "state": {"initChown": False}, "kubelet": {"podResources": {"enabled": False}},
                "serviceMonitor": {"enabled": True, "honorLabels": True, "instanceFromNodeName": False}},
    # as root for the kubelet's socket, and the config as verbatim text
    "root": {"podSecurityContext": {"runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0},
             "config": "gpu:\n  backend: nvml\nworkloads:\n  enabled: true\ngrid:\n  carbon: null\n"},
}


# --- rendering ------------------------------------------------------------------------------------------


@cache
def chart() -> Any:
    return helm.Chart.load(str(CHART))


def render_files(values: dict[str, Any] | None = None, name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` (an install) would make it."""
    return dict(chart().render(values=copy.deepcopy(values) if values else None, name=name,
                               namespace=NAMESPACE, is_install=True))


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> list[dict[str, Any]]:
    """Every object rendered, in template order."""
    out = []
    for path, text in sorted(render_files(values, name).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def notes(values: dict[str, Any] | None = None) -> str:
    files = render_files(values)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def daemonset(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return one(render(values), "DaemonSet")


def container(pod_spec: dict[str, Any], name: str = "wattson") -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("DaemonSet", "Deployment"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def config_of(objects: list[dict[str, Any]], name: str) -> str:
    return str(one(objects, "ConfigMap", name)["data"]["wattson.yml"])


def hub_url(port: int = 9874, release: str = RELEASE) -> str:
    return f"http://{release}-hub.{NAMESPACE}.svc:{port}"


# --- the chart itself -----------------------------------------------------------------------------------


def load_sync_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("helm_sync_files", HELM_DIR / "sync_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_copies_of_rules_and_dashboards_are_current() -> None:
    """Helm reads only files inside the chart: its copies must be what prometheus/ and grafana/ ship now."""
    sync = load_sync_script()
    differences = sync.differences()
    assert not differences, ("the chart's copies are out of date; run python deploy/helm/sync_files.py:\n"
                             + "\n".join(differences))
    assert sorted(p.name for p in (CHART / "files" / "rules").glob("*.yml")) == \
        sorted(p.name for p in RULES.glob("*.yml"))


def test_packaged_chart_carries_the_rules_and_dashboards(tmp_path: Path) -> None:
    """`helm package` keeps files/ (nothing in .helmignore drops it): the archive renders the same objects."""
    archive = helm.package(str(CHART), destination=str(tmp_path))
    values = {"prometheusRule": {"enabled": True}, "dashboards": {"enabled": True}}
    with helm.Chart.load(archive) as packaged:
        from_archive = packaged.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE,
                                       is_install=True)
    assert from_archive == render_files(values)


def test_app_version_is_the_package_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = chart().metadata
    assert meta["appVersion"] == project["version"]
    assert meta["apiVersion"] == "v2"  # installable with Helm 3 as well as 4


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_helm_lint_passes(case: str) -> None:
    report = helm.lint(str(CHART), values=copy.deepcopy(VALUE_SETS[case]) or None, strict=True,
                       namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], report


def test_values_schema_is_strict() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"bogus": 1}, "bogus"),
        ({"serviceMonitor": {"enable": True}}, "enable"),
        ({"service": {"port": "http"}}, "/service/port"),
        ({"config": {"sampler_interval": 1}}, "sampler_interval"),
        ({"hub": {"config": {"gpus": {}}}}, "gpus"),
        ({"existingSecretEnv": {"NOT-A-VAR": "key"}}, "NOT-A-VAR"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy")]
    for bad, where in cases:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart().validate_schema(bad)
        with pytest.raises(helm.HelmError):
            render(bad)
    # Helm passes `global` to every chart that is a dependency of another: it must be accepted.
    chart().validate_schema({"global": {"imageRegistry": "x"}})


def test_schema_knows_every_top_level_key_of_wattsons_config() -> None:
    from wattson.config import Config

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["definitions"]["wattsonConfig"]["properties"])
    assert keys == set(Config.model_fields), "values.schema.json (wattsonConfig) and wattson.config.Config differ"


# --- every object valid ---------------------------------------------------------------------------------


def strict_crd_schema(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation reads it: objects with declared properties
    take no others, unless they preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict_crd_schema(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_crd_schema(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = strict_crd_schema(json.loads((CRD_SCHEMAS / f"{kind.lower()}.json").read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # checked as ObjectMeta below
    return jsonschema.Draft7Validator(schema)


def validate_object(obj: dict[str, Any]) -> None:
    if obj["kind"] in CRD_KINDS:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{obj['kind']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                                     for e in errors)
        # metadata is ObjectMeta for a custom resource too: check it as a ConfigMap's
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                     KUBE_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid(case: str) -> None:
    objects = render(VALUE_SETS[case])
    assert objects
    for obj in objects:
        try:
            validate_object(obj)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        assert obj["metadata"].get("namespace") == NAMESPACE or obj["kind"] in CRD_KINDS


def test_strict_validation_rejects_unknown_fields() -> None:
    """The validators above are strict: a misspelt field anywhere is an error, not silently dropped."""
    ds = daemonset()
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(ds)
    sm = one(render(EVERYTHING), "ServiceMonitor")
    sm["spec"]["endpoints"][0]["honourLabels"] = False
    with pytest.raises(AssertionError, match="honourLabels"):
        validate_object(sm)


def test_objects_rendered_by_default_and_with_everything() -> None:
    kinds = sorted(o["kind"] for o in render())
    assert kinds == ["ConfigMap", "DaemonSet", "Service", "ServiceAccount"]
    everything = render(EVERYTHING)
    counts: dict[str, int] = {}
    for o in everything:
        counts[o["kind"]] = counts.get(o["kind"], 0) + 1
    assert counts == {"ConfigMap": 2 + len(list(DASHBOARDS.glob("*.json"))), "DaemonSet": 1, "Deployment": 1,
                      "Service": 2, "ServiceAccount": 1, "ServiceMonitor": 1, "PodMonitor": 1,
                      "PrometheusRule": 1}
    assert "Secret" not in counts  # API keys only ever come from an existing Secret


# --- the DaemonSet --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_no_container_requests_a_gpu(case: str) -> None:
    """wattson reads counters through NVML; a nvidia.com/gpu request would take a GPU from the workloads."""
    for where, spec in pod_specs(render(VALUE_SETS[case])):
        for c in spec.get("initContainers", []) + spec["containers"]:
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                assert not any(k.startswith("nvidia.com/") for k in resources.get(section, {})), (where, c["name"])


def test_nvml_through_the_container_toolkit() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container(spec)["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert "runtimeClassName" not in spec
    assert daemonset({"runtimeClassName": "nvidia"})["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    hub = one(render({"hub": {"enabled": True}}), "Deployment")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in hub and not any(e["name"].startswith("NVIDIA_")
                                                     for e in container(hub).get("env", []))


def test_gpu_nodes_only_and_their_taint_tolerated() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # Helm merges maps with the defaults: null removes the default label
    custom = daemonset({"nodeSelector": {"gpu": "yes", "nvidia.com/gpu.present": None}})
    assert custom["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "yes"}
    added = daemonset({"nodeSelector": {"pool": "h100"}})["spec"]["template"]["spec"]
    assert added["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "h100"}


@pytest.mark.parametrize("case", ["defaults", "everything"])
def test_security_context(case: str) -> None:
    objects = render(VALUE_SETS[case])
    for where, spec in pod_specs(objects):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["runAsGroup"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostIPC"), where
        main = container(spec)["securityContext"]
        assert main["privileged"] is False, where
        assert main["allowPrivilegeEscalation"] is False, where
        assert main["readOnlyRootFilesystem"] is True, where
        assert main["capabilities"] == {"drop": ["ALL"]}, where
        assert main["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert "runAsUser" not in main  # the pod's uid applies
    ds = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert ds.get("hostPID", False) is (case == "everything")
    (init,) = ds["initContainers"]
    ctx = init["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    assert ctx["privileged"] is False and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert init["command"] == ["chown", "-R", "10001:10001", "/var/lib/wattson"]
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False


def test_init_container_follows_the_uid_and_can_be_left_out() -> None:
    root = daemonset(VALUE_SETS["root"])["spec"]["template"]["spec"]
    assert root["securityContext"]["runAsUser"] == 0
    assert root["initContainers"][0]["command"][2] == "0:0"
    assert "initContainers" not in daemonset({"state": {"initChown": False}})["spec"]["template"]["spec"]


def test_state_on_a_host_directory() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    main = container(spec)
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/wattson", "type": "DirectoryOrCreate"}
    assert mounts["/var/lib/wattson"]["name"] == "state" and not mounts["/var/lib/wattson"].get("readOnly")
    assert "--storage.path=/var/lib/wattson" in main["args"]
    assert mounts["/etc/wattson/wattson.yml"] == {"name": "config", "mountPath": "/etc/wattson/wattson.yml",
                                                  "subPath": "wattson.yml", "readOnly": True}
    assert volumes["config"]["configMap"]["name"] == RELEASE
    assert "--config.file=/etc/wattson/wattson.yml" in main["args"]
    assert "--web.listen-address=:9874" in main["args"]
    # flags wattson knows, with the values the mounts above expect
    from wattson.cli import build_parser

    for case in VALUE_SETS.values():
        for _where, spec in pod_specs(render(case)):
            args = build_parser().parse_args(container(spec)["args"])
            assert (args.config_file, args.storage_path) == ("/etc/wattson/wattson.yml", "/var/lib/wattson")
            assert args.listen_address == ":9874"
    # the boot id comes from the container's own /proc: it is the host's (not namespaced), nothing is mounted
    assert not any("boot_id" in m["mountPath"] for m in main["volumeMounts"])
    assert volumes["tmp"]["emptyDir"]["medium"] == "Memory"


def test_boot_id_is_not_namespaced(tmp_path: Path) -> None:
    """Why the chart mounts nothing for the boot id: a process in new namespaces, with a procfs of its own
    (as in a container), reads the same /proc/sys/kernel/random/boot_id as the host."""
    unshare = find_tool("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    path = "/proc/sys/kernel/random/boot_id"
    result = subprocess.run([unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--uts",
                             "--ipc", "--net", "--cgroup", "cat", path], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot create namespaces here: {result.stderr.strip()}")
    assert result.stdout.strip() == Path(path).read_text().strip()


def test_kubelet_pod_resources_directory_mounted_read_only() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == POD_RESOURCES]
    assert volume["hostPath"]["type"] == "Directory"  # the directory, not kubelet.sock: survives kubelet restarts
    (mount,) = [m for m in container(spec)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": POD_RESOURCES, "readOnly": True}
    # another kubelet root: the host's directory, mounted where wattson looks by default
    from wattson.config import WorkloadsConfig

    assert WorkloadsConfig().kubelet_pod_resources_socket == f"{POD_RESOURCES}/kubelet.sock"
    k0s = daemonset({"kubelet": {"podResources": {"hostPath": "/var/lib/k0s/kubelet/pod-resources"}}})
    spec = k0s["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "pod-resources"]
    assert volume["hostPath"] == {"path": "/var/lib/k0s/kubelet/pod-resources", "type": "Directory"}
    assert {"name": "pod-resources", "mountPath": POD_RESOURCES, "readOnly": True} in container(spec)["volumeMounts"]
    off = daemonset({"kubelet": {"podResources": {"enabled": False}}})["spec"]["template"]["spec"]
    assert not any(v.get("hostPath", {}).get("path") == POD_RESOURCES for v in off["volumes"])
    assert not any(m["mountPath"] == POD_RESOURCES for m in container(off)["volumeMounts"])


def test_probes() -> None:
    main = container(daemonset()["spec"]["template"]["spec"])
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["ports"] == [{"name": "metrics", "containerPort": 9874, "protocol": "TCP"}]
    tls = container(daemonset({"webConfig": {"existingSecret": "web", "tls": True}})["spec"]["template"]["spec"])
    assert tls["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert "--web.config.file=/etc/wattson/web/web-config.yml" in tls["args"]
    tcp = container(daemonset({"livenessProbe": {"httpGet": None, "tcpSocket": {"port": "metrics"}},
                               "readinessProbe": None})["spec"]["template"]["spec"])
    assert tcp["livenessProbe"]["tcpSocket"] == {"port": "metrics"} and "httpGet" not in tcp["livenessProbe"]
    assert "readinessProbe" not in tcp


def test_resources_are_sized() -> None:
    main = container(daemonset()["spec"]["template"]["spec"])
    assert main["resources"] == {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def test_pod_settings_pass_through() -> None:
    ds = one(render(EVERYTHING), "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    meta = ds["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "gpu" and meta["annotations"]["example.net/team"] == "gpu"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    main = container(spec)
    assert main["image"] == "registry.example.net/wattson:0.1.0" and main["imagePullPolicy"] == "Always"
    assert main["args"][-1] == "--log.level=debug"
    assert {"name": "TZ", "value": "UTC"} in main["env"]
    assert {"name": "hub-ca", "mountPath": "/etc/wattson/hub-ca", "readOnly": True} in main["volumeMounts"]
    assert spec["securityContext"]["supplementalGroups"] == [44]
    assert container(daemonset({"image": {"digest": "sha256:" + "a" * 64}})["spec"]["template"]["spec"])[
        "image"] == "wattson@sha256:" + "a" * 64


def test_api_keys_only_from_an_existing_secret() -> None:
    everything = render(EVERYTHING)
    main = container(one(everything, "DaemonSet")["spec"]["template"]["spec"])
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in main["env"] if "valueFrom" in e}
    assert refs == {"ELECTRICITYMAPS_API_KEY": {"name": "wattson-keys", "key": "electricitymaps"},
                    "WATTSON_HUB_PASSWORD": {"name": "wattson-keys", "key": "hub"}}
    assert "envFrom" not in main
    env_from = render(VALUE_SETS["envFrom"])
    main = container(one(env_from, "DaemonSet")["spec"]["template"]["spec"])
    assert main["envFrom"] == [{"secretRef": {"name": "wattson-keys"}}]
    hub = container(one(env_from, "Deployment")["spec"]["template"]["spec"])
    assert hub["envFrom"] == [{"secretRef": {"name": "hub-keys"}}]
    default = container(daemonset()["spec"]["template"]["spec"])
    assert "envFrom" not in default and not any("valueFrom" in e for e in default["env"])
    for objects in (everything, env_from):
        assert not any(o["kind"] == "Secret" for o in objects)


def config_checksum(values: dict[str, Any] | None, kind: str = "DaemonSet") -> str:
    return str(one(render(values), kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


def test_config_change_rolls_the_pods() -> None:
    base = config_checksum(None)
    assert base == config_checksum(None)
    assert base == config_checksum({"podLabels": {"unrelated": "change"}})
    assert base != config_checksum({"config": {"sampler": {"interval_seconds": 2.0}}})
    assert base != config_checksum({"config": {"grid": {"pue": 1.3}}})
    objects = render({"hub": {"enabled": True}})
    ds = one(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    cm = next(t for p, t in render_files({"hub": {"enabled": True}}).items() if p.endswith("/configmap.yaml"))
    assert ds == hashlib.sha256(cm.encode()).hexdigest()
    hub = {"hub": {"enabled": True}}
    changed = {"hub": {"enabled": True, "config": {"grid": {"carbon": {"zone": "FR"}}}}}
    assert config_checksum(hub, "Deployment") != config_checksum(changed, "Deployment")


# --- the wattson configs --------------------------------------------------------------------------------


def load_wattson_config(text: str, source: str) -> Any:
    """wattson's own loader and grid builder: what wattson would do with this file at start."""
    from wattson.config import parse_config
    from wattson.grid.registry import build_grid

    cfg = parse_config(text, source)
    build_grid(cfg)  # sources check their settings (zones of bundled data, price bounds) here
    return cfg


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_rendered_configs_are_accepted_by_wattson(case: str) -> None:
    objects = render(VALUE_SETS[case])
    cfg = load_wattson_config(config_of(objects, RELEASE), f"{case}: ConfigMap {RELEASE}")
    assert cfg.gpu.backend == "nvml"
    if any(o["kind"] == "Deployment" for o in objects):
        hub = load_wattson_config(config_of(objects, f"{RELEASE}-hub"), f"{case}: ConfigMap {RELEASE}-hub")
        assert hub.gpu.backend == "none"


def test_default_config() -> None:
    cfg = load_wattson_config(config_of(render(), RELEASE), "defaults")
    assert cfg.workloads.enabled is False and cfg.sampler.interval_seconds == 1.0
    assert [s.type for s in cfg.grid.carbon.sources] == ["bundled"]  # wattson's own default chains


def test_hosts_read_the_hub_with_a_local_fallback() -> None:
    objects = render({"hub": {"enabled": True, "config": {"grid": {"carbon": {"zone": "FR"}}},
                              "service": {"port": 9875}}})
    cfg = load_wattson_config(config_of(objects, RELEASE), "hub")
    carbon, price = cfg.grid.carbon, cfg.grid.price
    assert [s.type for s in carbon.sources] == ["wattson", "bundled"] and carbon.zone == "FR"
    assert [s.type for s in price.sources] == ["wattson", "static"] and price.zone == "DE"
    assert carbon.sources[0].base_url == price.sources[0].base_url == hub_url(9875)
    service = one(objects, "Service", f"{RELEASE}-hub")
    assert service["spec"]["ports"][0]["port"] == 9875
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "hub"
    hub = load_wattson_config(config_of(objects, f"{RELEASE}-hub"), "hub config")
    assert hub.gpu.backend == "none" and hub.grid.carbon.zone == "FR"
    assert [s.type for s in hub.grid.carbon.sources] == ["electricitymaps", "bundled"]
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == f"{RELEASE}-hub"
    # a release named otherwise: <release>-wattson-hub
    other = render({"hub": {"enabled": True}}, name="gpu")
    assert load_wattson_config(config_of(other, "gpu-wattson"), "other").grid.price.sources[0].base_url == \
        f"http://gpu-wattson-hub.{NAMESPACE}.svc:9874"


def test_hub_settings_that_the_hosts_keep_or_drop() -> None:
    # a chain the user configured is kept as it is
    own = {"type": "static", "grams_per_kwh": 300}
    objects = render({"hub": {"enabled": True}, "config": {"grid": {"carbon": {"zone": "DE", "sources": [own]}}}})
    cfg = load_wattson_config(config_of(objects, RELEASE), "own chain")
    assert [s.type for s in cfg.grid.carbon.sources] == ["static"]
    assert [s.type for s in cfg.grid.price.sources] == ["wattson", "static"]
    # null disables a signal: on the hub (Helm drops the null, the chart writes it back) and on the hosts
    objects = render({"hub": {"enabled": True, "config": {"grid": {"carbon": None}}},
                      "config": {"grid": {"price": None}}})
    hub = load_wattson_config(config_of(objects, f"{RELEASE}-hub"), "hub without carbon")
    assert hub.grid.carbon is None and hub.grid.price is not None
    host = load_wattson_config(config_of(objects, RELEASE), "host")
    assert host.grid.price is None
    assert all(s.type != "wattson" for s in host.grid.carbon.sources)  # the hub does not serve carbon
    # gpu.backend is always none on the hub
    forced = render({"hub": {"enabled": True, "config": {"gpu": {"backend": "nvml"}}}})
    assert load_wattson_config(config_of(forced, f"{RELEASE}-hub"), "forced").gpu.backend == "none"


def test_verbatim_config_text() -> None:
    text = config_of(render(VALUE_SETS["root"]), RELEASE)
    assert text == VALUE_SETS["root"]["config"]
    assert load_wattson_config(text, "verbatim").grid.carbon is None


# --- Prometheus operator --------------------------------------------------------------------------------


def shipped_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES.glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def test_prometheus_rule_is_the_shipped_rules() -> None:
    rule = one(render({"prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"}}}),
               "PrometheusRule")
    assert rule["spec"]["groups"] == shipped_groups()  # prometheus/rules/*.yml as they are now, not the copy
    assert rule["metadata"]["labels"]["release"] == "kps"
    excluded = one(render({"prometheusRule": {"enabled": True, "excludeGroups": ["wattson-workloads"]}}),
                   "PrometheusRule")
    assert [g["name"] for g in excluded["spec"]["groups"]] == \
        [g["name"] for g in shipped_groups() if g["name"] != "wattson-workloads"]


@pytest.mark.integration
def test_prometheus_rule_groups_load_in_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rule = one(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_monitor() -> None:
    objects = render(EVERYTHING)
    sm = one(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = sm["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2  # the exporter's and the hub's: one monitor scrapes both
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["scheme"] == "https"
    assert endpoint["honorLabels"] is False
    assert endpoint["tlsConfig"] == EVERYTHING["serviceMonitor"]["tlsConfig"]
    assert endpoint["basicAuth"] == EVERYTHING["serviceMonitor"]["basicAuth"]
    assert endpoint["relabelings"][0] == {"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                                          "targetLabel": "instance", "action": "replace"}
    assert endpoint["relabelings"][-1] == {"targetLabel": "cluster", "replacement": "gpu-east"}
    assert endpoint["metricRelabelings"][-1]["regex"] == "wattson_sampler_.*"
    assert one(objects, "Service", RELEASE)["spec"]["internalTrafficPolicy"] == "Local"
    assert "internalTrafficPolicy" not in one(render(), "Service")["spec"]


def test_pod_monitor() -> None:
    objects = render(EVERYTHING)
    pm = one(objects, "PodMonitor")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "20s"
    assert endpoint["honorLabels"] is False
    selector = pm["spec"]["selector"]["matchLabels"]
    for _where, spec in pod_specs(objects):
        assert [p["name"] for p in container(spec)["ports"]] == ["metrics"]
    for o in objects:
        if o["kind"] in ("DaemonSet", "Deployment"):
            assert selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()


def test_honor_labels_switches_off_the_workload_relabeling() -> None:
    endpoint = one(render(VALUE_SETS["envFrom"]), "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True
    assert "metricRelabelings" not in endpoint and "relabelings" not in endpoint


def test_notes_warn_about_an_unlabelled_monitor() -> None:
    assert "will not scrape it" in notes({"serviceMonitor": {"enabled": True}})
    assert "will not scrape it" not in notes({"serviceMonitor": {"enabled": True, "labels": {"release": "x"}}})
    assert "scraped twice" in notes({"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}})
    assert "root-only" in notes({"config": {"workloads": {"enabled": True}}})
    assert "root-only" not in notes({"config": {"workloads": {"enabled": True}}, **VALUE_SETS["root"]})
    assert "port-forward" in notes()


# --- Grafana --------------------------------------------------------------------------------------------


def dashboard_maps(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dashboard file name -> its ConfigMap."""
    out = {}
    for o in render(values):
        if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]:
            (key,) = o["data"]
            out[key] = o
    return out


def test_dashboards_for_the_grafana_sidecar() -> None:
    maps = dashboard_maps({"dashboards": {"enabled": True}})
    shipped = {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
    assert sorted(maps) == sorted(shipped)
    for name, cm in maps.items():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert "annotations" not in cm["metadata"]
        assert json.loads(cm["data"][name]) == shipped[name]
    custom = dashboard_maps({"dashboards": {"enabled": True, "label": "grafana.example.net/dashboard",
                                            "labelValue": "yes", "folder": "GPU energy",
                                            "folderAnnotation": "grafana_folder", "datasourceUid": "prometheus",
                                            "namespace": "grafana"}})
    for name, cm in custom.items():
        assert cm["metadata"]["labels"]["grafana.example.net/dashboard"] == "yes"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "GPU energy"}
        assert cm["metadata"]["namespace"] == "grafana"
        dashboard = json.loads(cm["data"][name])
        variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
        assert variable["current"]["value"] == "prometheus"
        expected = copy.deepcopy(shipped[name])
        next(v for v in expected["templating"]["list"] if v["type"] == "datasource")["current"]["value"] = \
            "prometheus"
        assert dashboard == expected  # nothing else changed
    assert not dashboard_maps({})


# --- what Prometheus makes of the labels ----------------------------------------------------------------


EXPOSITION = """\
# TYPE wattson_workload_info gauge
wattson_workload_info{kind="pod",workload="6f1c2b3a-4d5e-4f60-8a9b-0c1d2e3f4a5b",user="svc",pod="infer-7d9f",\
namespace="serving"} 1
wattson_workload_info{kind="slurm_job",workload="4242",user="alice",pod="",namespace=""} 1
# TYPE wattson_workload_energy_joules_total counter
wattson_workload_energy_joules_total{kind="pod",workload="6f1c2b3a-4d5e-4f60-8a9b-0c1d2e3f4a5b",gpu="0",\
uuid="GPU-1"} 10
# TYPE wattson_gpu_power_watts gauge
wattson_gpu_power_watts{gpu="0",uuid="GPU-1"} 300
"""
# The labels the Prometheus operator gives a ServiceMonitor's target, and the pod's node for relabeling.
TARGET_LABELS = {"namespace": NAMESPACE, "pod": "wattson-x7k2p", "container": "wattson", "service": RELEASE,
                 "endpoint": "metrics", "__meta_kubernetes_pod_node_name": "gpu-node-1"}


def prometheus_relabel(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's relabel configs in Prometheus's own spelling."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{names.get(k, k): (v.lower() if k == "action" else v) for k, v in c.items()} for c in configs]


@pytest.mark.integration
def test_scraped_labels_in_prometheus(tmp_path: Path) -> None:
    """A real Prometheus scrapes a fake wattson the way the operator configures it from the chart's
    ServiceMonitor: workload series keep the workload's pod and namespace, the rest the target's, instance is
    the node. A second job with honorLabels shows the trade-off docs/kubernetes.md describes."""
    from bench.common import free_port, stop_process, wait_for
    from tests.fixture_server import FixtureServer
    from tests.promstack import query

    prometheus = require_tool("prometheus")
    endpoint = one(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")["spec"]["endpoints"][0]
    with FixtureServer(routes={"/metrics": (200, {"Content-Type": "text/plain; version=0.0.4"},
                                            EXPOSITION.encode())}) as server:
        target = {"targets": [f"127.0.0.1:{server.port}"], "labels": TARGET_LABELS}
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": "chart", "honor_labels": endpoint["honorLabels"], "static_configs": [target],
                 "relabel_configs": prometheus_relabel(endpoint["relabelings"]),
                 "metric_relabel_configs": prometheus_relabel(endpoint["metricRelabelings"])},
                {"job_name": "honor", "honor_labels": True, "static_configs": [target]},
            ]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "wb") as log:
            proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            def scraped() -> bool:
                if proc.poll() is not None:
                    raise AssertionError((tmp_path / "prometheus.log").read_text())
                try:
                    return len(query(base, "up == 1")) == 2 and \
                        len(query(base, "wattson_gpu_power_watts")) == 2
                except OSError:
                    return False

            wait_for("both jobs scraped", scraped, 30)

            def series(promql: str) -> list[dict[str, str]]:
                return sorted((r["metric"] for r in query(base, promql)), key=lambda m: m.get("kind", ""))

            info = series('wattson_workload_info{job="chart"}')
            assert [m.get("namespace") for m in info] == ["serving", None]
            assert [m.get("pod") for m in info] == ["infer-7d9f", None]
            assert all(m["instance"] == "gpu-node-1" for m in info)
            assert not any(k.startswith("exported_") for m in info for k in m)
            (power,) = series('wattson_gpu_power_watts{job="chart"}')
            assert power["namespace"] == NAMESPACE and power["pod"] == "wattson-x7k2p"
            # the shipped namespace chargeback rules' join sees only the pod's namespace
            joined = series('max by (instance, kind, workload, namespace) '
                            '(wattson_workload_info{job="chart", kind="pod", namespace!=""})')
            assert [m["namespace"] for m in joined] == ["serving"]
            # honorLabels: wattson's labels win where it sets them, its empty ones included; its other series
            # keep the target's
            honored = series('wattson_workload_info{job="honor"}')
            assert [m.get("namespace") for m in honored] == ["serving", None]
            assert [m.get("pod") for m in honored] == ["infer-7d9f", None]
            assert honored[0]["instance"] == f"127.0.0.1:{server.port}"
            (power,) = series('wattson_gpu_power_watts{job="honor"}')
            assert power["namespace"] == NAMESPACE and power["pod"] == "wattson-x7k2p"
        finally:
            stop_process(proc, grace_seconds=10)
