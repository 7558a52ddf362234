"""deploy/kubernetes/: the kustomize base that runs several gateway instances.

The base is rendered with `kubectl kustomize` when kubectl is installed, else read in Python (the
files under `resources:` and the ConfigMaps of `configMapGenerator:`, without kustomize's hash
suffix). Every object is validated strictly against the Kubernetes API schema (kubernetes-validate),
and the properties the deployment relies on are checked on the parsed objects, each by the field
that carries it.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from gateway.shell.settings import load_config, load_policies

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
# A Kubernetes version whose schemas kubernetes-validate ships from its lowest allowed version on.
KUBERNETES_VERSION = "1.31"
ADMIN_PORT = 9102
CLIENT_PORT = 8443


# -- rendering -------------------------------------------------------------------


def render_with_kubectl(kubectl: str) -> list[dict]:
    result = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_in_python() -> list[dict]:
    """What kustomize would render, near enough for the checks here: the resources as written and
    the generated ConfigMaps (named without the content hash, as the volumes name them)."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization.get("resources", []):
        objects += [doc for doc in yaml.safe_load_all((BASE / resource).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
            data[key or Path(source).name] = (BASE / source).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    return objects


@pytest.fixture(scope="module", params=["kubectl", "python"])
def objects(request) -> list[dict]:
    if request.param == "kubectl":
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed: the base is read in Python instead (the other case)")
        return render_with_kubectl(kubectl)
    return render_in_python()


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def gateway_set(objects: list[dict]) -> dict:
    return one(objects, "StatefulSet", "gateway")


def pod_spec(objects: list[dict]) -> dict:
    return gateway_set(objects)["spec"]["template"]["spec"]


def container(objects: list[dict]) -> dict:
    (found,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "gateway"]
    return found


def volume(objects: list[dict], name: str) -> dict:
    (found,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == name]
    return found


def mount_of(objects: list[dict], path: str | Path) -> dict:
    """The volumeMount a file lives under (the deepest mount holding it)."""
    path = PurePosixPath(path)
    holding = [m for m in container(objects)["volumeMounts"]
               if path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents]
    assert holding, f"{path} is on no volume: the root filesystem is read-only"
    return max(holding, key=lambda m: len(m["mountPath"]))


def secret_volume_of(objects: list[dict], path: str | Path) -> dict:
    mount = mount_of(objects, path)
    vol = next((v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"]), {})
    assert "secret" in vol, f"{path} is not on a Secret volume (mount {mount['name']})"
    return vol


def claim_names(objects: list[dict]) -> set[str]:
    return {t["metadata"]["name"] for t in gateway_set(objects)["spec"].get("volumeClaimTemplates", [])}


def config_text(objects: list[dict]) -> str:
    """config.yaml, from the ConfigMap the gateway's config volume names."""
    name = volume(objects, "config")["configMap"]["name"]
    return one(objects, "ConfigMap", name)["data"]["config.yaml"]


def config(objects: list[dict]) -> dict:
    return yaml.safe_load(config_text(objects))


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get(
        "matchExpressions")


def gateway_pod_labels(objects: list[dict]) -> dict:
    return gateway_set(objects)["spec"]["template"]["metadata"]["labels"]


# -- the API schema ------------------------------------------------------------------


def test_every_object_validates_strictly_against_the_kubernetes_api_schema(objects):
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_a_field_the_api_does_not_have(objects):
    broken = copy.deepcopy(gateway_set(objects))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True   # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubectl_renders_the_objects_the_python_reading_expects():
    """The fallback stays honest: the same kinds and names (less the ConfigMaps' hash) as kustomize's."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")

    def names(objs, hashed):
        return sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if hashed and o["kind"] == "ConfigMap"
                       else o["metadata"]["name"]) for o in objs)

    assert names(render_with_kubectl(kubectl), True) == names(render_in_python(), False)


# -- the gateway instances ------------------------------------------------------------


def test_several_instances_run(objects):
    assert gateway_set(objects)["spec"]["replicas"] >= 2


def test_the_gateway_runs_as_a_non_root_user(objects):
    pod = pod_spec(objects).get("securityContext", {})
    own = container(objects).get("securityContext", {})
    assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
    assert own.get("runAsUser", pod.get("runAsUser", 0)) != 0


def test_the_root_filesystem_is_read_only(objects):
    assert container(objects)["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_probes_ask_the_admin_port(objects):
    c = container(objects)
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}

    def port(probe):
        value = probe["httpGet"]["port"]
        return ports.get(value, value)

    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert port(c["livenessProbe"]) == ADMIN_PORT
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert port(c["readinessProbe"]) == ADMIN_PORT
    assert config(objects)["admin"]["port"] == ADMIN_PORT


def test_resources_are_requested(objects):
    requests = container(objects)["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")


def test_the_gateway_is_started_with_the_mounted_config(objects):
    c = container(objects)
    args = c.get("args", [])
    config_path = args[args.index("-c") + 1]
    assert mount_of(objects, config_path)["name"] == "config"
    assert PurePosixPath(config_path).name == "config.yaml"


# -- config.yaml ------------------------------------------------------------------------


def test_the_config_is_a_valid_gateway_config(objects, tmp_path):
    (tmp_path / "config.yaml").write_text(config_text(objects))
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded.listen.host == "0.0.0.0" and loaded.listen.port == CLIENT_PORT
    assert loaded.admin.host == "0.0.0.0" and loaded.admin.port == ADMIN_PORT
    assert loaded.upstream.url == "embedded"


def test_the_config_is_the_one_kustomize_packs():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "gateway-config"]
    assert "config.yaml" in generator["files"]


def test_changed_files_are_picked_up_by_the_watch(objects):
    assert config(objects)["reload"]["watch_s"] > 0


def test_the_tls_files_come_from_a_secret_mounted_as_a_folder(objects):
    tls = config(objects)["tls"]
    volumes = {secret_volume_of(objects, tls[key])["name"] for key in ("cert", "key", "client_ca", "crl")}
    assert volumes == {"tls"}
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["name"] == "tls"]
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount is never updated"


def test_no_secret_or_configmap_is_mounted_with_subpath(objects):
    kinds = {v["name"] for v in pod_spec(objects)["volumes"] if "secret" in v or "configMap" in v}
    with_subpath = [m["name"] for m in container(objects)["volumeMounts"]
                    if m["name"] in kinds and ("subPath" in m or "subPathExpr" in m)]
    assert not with_subpath


def test_the_audit_log_is_on_a_volume_claim_of_its_own_instance(objects):
    path = config(objects)["audit"]["path"]
    assert mount_of(objects, path)["name"] in claim_names(objects)
    assert not mount_of(objects, path).get("readOnly")


def test_the_audit_key_comes_from_a_secret_off_the_logs_volume(objects):
    key_file = config(objects)["audit"]["key_file"]
    assert secret_volume_of(objects, key_file)["name"] == "audit-key"
    assert mount_of(objects, key_file)["name"] not in claim_names(objects)


@pytest.mark.parametrize("key", ["audit.path", "reference_api.data_dir", "tls.revocation.cache_dir",
                                 "identity_token.key"])
def test_what_the_gateway_writes_is_on_a_persistent_volume(objects, key):
    value = config(objects)
    for part in key.split("."):
        value = value[part]
    mount = mount_of(objects, value)
    assert mount["name"] in claim_names(objects), f"{key} ({value}) is not on the instance's volume claim"
    assert not mount.get("readOnly")


def test_the_claims_outlive_the_pod(objects):
    spec = gateway_set(objects)["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_the_policies_are_the_committed_examples(objects):
    name = volume(objects, "policies")["configMap"]["name"]
    data = one(objects, "ConfigMap", name)["data"]
    examples = {p.name: p.read_text() for p in sorted((ROOT / "policies").glob("*.yaml"))}
    assert data == examples, "deploy/kubernetes/policies/ differs from policies/*.yaml: copy them again"
    policies_path = config(objects)["policies"]
    assert mount_of(objects, policies_path)["name"] == "policies"


def test_the_policies_load(objects, tmp_path):
    name = volume(objects, "policies")["configMap"]["name"]
    for file, text in one(objects, "ConfigMap", name)["data"].items():
        (tmp_path / file).write_text(text)
    assert load_policies(tmp_path)


# -- shared rate limits ------------------------------------------------------------------


def test_redis_runs_and_the_config_points_at_it(objects):
    storage = config(objects)["rate_limit"]["storage"]
    assert storage.startswith("redis://")
    host, _, port = storage.removeprefix("redis://").split("/")[0].partition(":")
    service = one(objects, "Service", host)
    assert int(port or 6379) in [p["port"] for p in service["spec"]["ports"]]
    deployment = one(objects, "Deployment", "redis")
    assert selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    assert any(c["name"] == "redis" for c in deployment["spec"]["template"]["spec"]["containers"])


# -- disruption, network, service ---------------------------------------------------------


def test_a_pod_disruption_budget_covers_the_gateway(objects):
    (pdb,) = [p for p in of_kind(objects, "PodDisruptionBudget")
              if selects(p["spec"]["selector"], gateway_pod_labels(objects))]
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def gateway_network_policy(objects: list[dict]) -> dict:
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy")
                 if selects(p["spec"]["podSelector"], gateway_pod_labels(objects))]
    assert "Ingress" in policy["spec"]["policyTypes"]
    return policy


def rules_for(policy: dict, port: int) -> list[dict]:
    """The ingress rules letting something reach `port` (a rule without ports covers every port)."""
    return [r for r in policy["spec"].get("ingress", [])
            if "ports" not in r or any(p.get("port") in (port, None) for p in r["ports"])]


def test_only_prometheus_reaches_the_admin_port(objects):
    rules = rules_for(gateway_network_policy(objects), ADMIN_PORT)
    assert rules, "nothing may reach the admin port: Prometheus cannot scrape"
    for rule in rules:
        assert rule.get("from"), "the admin port is open to every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            pods = peer.get("podSelector", {}).get("matchLabels", {})
            namespaces = peer.get("namespaceSelector", {}).get("matchLabels", {})
            assert any("prometheus" in str(v) for v in pods.values()), peer
            assert namespaces, f"{peer}: Prometheus-labelled pods of any namespace"


def test_the_client_port_stays_open(objects):
    assert any(not r.get("from") for r in rules_for(gateway_network_policy(objects), CLIENT_PORT))


def test_a_service_exposes_the_client_port_over_tcp(objects):
    services = [s for s in of_kind(objects, "Service")
                if selects({"matchLabels": s["spec"].get("selector", {})}, gateway_pod_labels(objects))
                and s["spec"].get("clusterIP") != "None"]
    ports = [(p["port"], p.get("protocol", "TCP")) for s in services for p in s["spec"]["ports"]]
    assert (CLIENT_PORT, "TCP") in ports
    assert all(s["spec"].get("type", "ClusterIP") in ("LoadBalancer", "ClusterIP") for s in services)
    assert all(ADMIN_PORT not in [p["port"] for p in s["spec"]["ports"]] for s in services
               if s["spec"].get("type") == "LoadBalancer"), "the admin port behind the public load balancer"
