"""Offline checks of the deploy artifacts, run by .ci/deploy-checks.

    python .ci/deploy_checks.py chart      helm lint + helm template for every helm/creditgate/ci/*.yaml and
                                           the example app chart; every rendered manifest validated against
                                           the Kubernetes schemas (strict) of 1.29 and the newest version
                                           kubernetes-validate carries; the pods, listeners, Services and
                                           ServiceMonitors checked, and the separate flusher (there exactly
                                           when flusher.separate, running `flush`, the serving pods' own
                                           flusher off exactly then); render-time guards and these checks
                                           proven to fire
    python .ci/deploy_checks.py dashboard  the Grafana dashboard parses and uses only contract metrics

No cluster, no network: helm-python-sdk renders with Helm's Go engine in-process, kubernetes-validate ships
the schemas. prometheus-operator's CRDs (ServiceMonitor, PrometheusRule), which those schemas lack, are
checked with cloudcoil-models-prometheus-operator: pydantic models generated from the CRDs' OpenAPI schemas,
validated strictly (no type coercion), and every field the model dropped is reported as unknown (the API
server prunes such a field; kubectl --validate=strict refuses it). The PrometheusRule's expressions go
through `promtool check rules` and its alerts through `promtool test rules` (.ci/alerts-test.yaml), promtool
being Debian's (package prometheus, installed by .ci/run).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "creditgate"
EXAMPLE = ROOT / "helm" / "examples" / "app-with-creditgate"
MIN_K8S = "1.29.0"  # Chart.yaml kubeVersion
K8S_VERSIONS = (MIN_K8S, kubernetes_validate.latest_version())
# CRDs the Kubernetes schemas lack: prometheus-operator's, as models generated from their OpenAPI schemas
CRD_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
}
CRD_PACKAGE = "cloudcoil-models-prometheus-operator"
CRD_SOURCE = f"prometheus-operator CRD schema, {CRD_PACKAGE} {package_version(CRD_PACKAGE)}"
ALERTS_TEST = ROOT / ".ci" / "alerts-test.yaml"  # promtool test rules, on ci/monitoring.yaml's rendering
SUPERVISOR_STOP_SECONDS = 5  # sidecar/supervisor.py: how long a stopping task may finish its batch
HARDENING = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class CheckFailed(Exception):
    pass


def fail(message: str) -> None:
    raise CheckFailed(message)


def refused(
    what: str,
    attempt: Callable[[], object],
    errors: type[Exception] | tuple[type[Exception], ...],
    expected: str,
    refuser: str,
) -> None:
    """A guard shown to hold: `attempt` must raise one of `errors` with `expected` in its message."""
    try:
        attempt()
    except errors as exc:
        if expected not in str(exc):
            fail(f"{what}: refused, but not naming {expected!r}: {exc}")
        print(f"  refused as expected: {what}")
        return
    fail(f"{what}: {refuser} accepted it; expected a refusal naming {expected!r}")


# ---------------------------------------------------------------- chart


def lint(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{MIN_K8S}")
    # severity: 1 info, 2 warning, 3 error; the only info today is "icon is recommended"
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    if report["errors"] or serious:
        fail(f"helm lint {values_file.name}: {report['errors'] or serious}")
    infos = "; ".join(m["error"] for m in report["messages"])
    print(f"  lint {values_file.relative_to(ROOT)}: ok" + (f" (info: {infos})" if infos else ""))


def render(chart: Path, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name="cg", namespace="billing")
    documents: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                fail(f"{path}: rendered a document that is not a Kubernetes object: {doc!r:.200}")
            documents.append(doc)
    return documents


def dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """The fields of `given` that are missing from `kept` (what a model parsed from it kept), by path."""
    if isinstance(given, dict) and isinstance(kept, dict):
        found = [f"{path}.{key}".lstrip(".") for key in given if key not in kept]
        for key, value in given.items():
            if key in kept:
                found += dropped(value, kept[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(kept, list):
        return [
            p
            for i, (g, k) in enumerate(zip(given, kept, strict=False))
            for p in dropped(g, k, f"{path}[{i}]")
        ]
    return []


def validate_crd(doc: dict[str, Any], model: type[pydantic.BaseModel]) -> None:
    """Strictly (a string is no integer, a number no string), and with no field the schema lacks."""
    try:
        parsed = model.model_validate(doc, strict=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        path = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CheckFailed(f"{path}: {first['msg']}{more}") from None
    unknown = dropped(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    if unknown:
        raise CheckFailed(f"unknown field(s) {', '.join(unknown)}")


def validate(doc: dict[str, Any], where: str) -> str:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
    if model is not None:
        try:
            validate_crd(doc, model)
        except CheckFailed as exc:
            fail(f"{where}: {name} does not match the {CRD_SOURCE}: {exc}")
        return f"{name} (CRD: {CRD_SOURCE})"
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            fail(f"{where}: {name} is invalid for Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            fail(f"{where}: no schema for {name}: {exc.message} (a CRD needs an entry in CRD_MODELS)")
    return name


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


CREDITGATE_CONTAINERS = ("creditgate", "flusher")  # serve (the API, or a native sidecar); flush


def creditgate_container(name: str, pod: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The pod's creditgate container (serving, or the separate flusher's), and whether it is a native
    sidecar (an init container)."""
    init = pod.get("initContainers", [])
    main = pod.get("containers", [])
    found = [(c, True) for c in init if c["name"] in CREDITGATE_CONTAINERS] + [
        (c, False) for c in main if c["name"] in CREDITGATE_CONTAINERS
    ]
    if len(found) != 1:
        fail(f"{name}: expected one creditgate container, found {len(found)}")
    return found[0]


def is_flusher(container: dict[str, Any]) -> bool:
    return bool(container["name"] == "flusher")


def container_ports(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        p for c in [*pod.get("initContainers", []), *pod.get("containers", [])] for p in c.get("ports", [])
    ]


def check_pod(name: str, pod: dict[str, Any]) -> None:
    """What schemas cannot see: the creditgate container's hardening, probes, shutdown budget, mounts."""
    container, is_sidecar = creditgate_container(name, pod)
    if pod.get("enableServiceLinks") is not False:
        fail(f"{name}: enableServiceLinks must be false (service links add CREDITGATE_* variables)")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mode = "sidecar" if is_sidecar else "standalone"
    if env.get("CREDITGATE_MODE") != mode:
        fail(f"{name}: CREDITGATE_MODE is {env.get('CREDITGATE_MODE')!r}, expected {mode!r}")
    if is_sidecar and container.get("restartPolicy") != "Always":
        fail(f"{name}: the creditgate init container must have restartPolicy: Always (native sidecar)")
    if not is_sidecar and "restartPolicy" in container:
        fail(f"{name}: a regular container cannot carry restartPolicy")
    security = container.get("securityContext", {})
    for key, wanted in HARDENING.items():
        if security.get(key) != wanted:
            fail(f"{name}: creditgate securityContext.{key} is {security.get(key)!r}, expected {wanted!r}")
    pod_security = pod.get("securityContext", {})
    if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        fail(f"{name}: runAsNonRoot is not set")
    probes = {
        kind: (container.get(kind) or {}).get("httpGet", {})
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    wanted_paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for kind, path in wanted_paths.items():
        if probes[kind].get("path") != path or probes[kind].get("port") != "ops":
            fail(f"{name}: {kind} must GET {path} on the port named ops, has {probes[kind]}")
    numbers = [p["containerPort"] for p in container_ports(pod)]
    clashes = sorted({n for n in numbers if numbers.count(n) > 1})
    if clashes:  # the pod's containers share one network namespace
        fail(f"{name}: containers declare the same port number twice: {clashes}")
    env = {e["name"]: e for e in container.get("env", [])}
    for required in ("CREDITGATE_REDIS_URL", "CREDITGATE_DATABASE_URL"):
        if "secretKeyRef" not in env.get(required, {}).get("valueFrom", {}):
            fail(f"{name}: {required} must come from a Secret (secretKeyRef)")
    for secret in SECRET_SETTINGS:  # optional, but never a plain value in the manifest
        if secret in env and "secretKeyRef" not in env[secret].get("valueFrom", {}):
            fail(f"{name}: {secret} must come from a Secret (secretKeyRef)")
    grace = int(env["CREDITGATE_SHUTDOWN_GRACE_SECONDS"]["value"])
    flush = int(env["CREDITGATE_SHUTDOWN_FLUSH_SECONDS"]["value"])
    period = pod.get("terminationGracePeriodSeconds", 30)
    if is_flusher(container):  # no traffic, so no preStop pause: its batch in hand, then the drain
        if period <= SUPERVISOR_STOP_SECONDS + flush:
            fail(f"{name}: terminationGracePeriodSeconds {period} <= batch stop 5 + flush {flush}")
        check_mounts(name, pod, container)
        return
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    match = re.search(r"time\.sleep\((\d+)\)", command)
    if match is None:
        fail(f"{name}: preStop is not the python sleep the chart renders: {command}")
        return
    pre_stop = int(match.group(1))
    if period <= pre_stop + grace + flush:
        fail(
            f"{name}: terminationGracePeriodSeconds {period} <= "
            f"preStop {pre_stop} + grace {grace} + flush {flush}"
        )
    check_mounts(name, pod, container)


def check_mounts(name: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            fail(f"{name}: volumeMount {mount['name']} has no volume in the pod")
    if not any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])):
        fail(f"{name}: /tmp must be a writable volume (the root filesystem is read-only)")


def config_text(docs: list[dict[str, Any]], where: str) -> str:
    configs = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    if len(configs) != 1:
        fail(f"{where}: expected one creditgate ConfigMap with config.yaml, found {len(configs)}")
    text: str = configs[0]["data"]["config.yaml"]
    return text


def load_rendered(text: str, environ: dict[str, str], where: str) -> Any:
    """creditgate's own settings loader on a rendered config file and environment (its refusals apply)."""
    from sidecar.config import load_settings

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        try:
            return load_settings(handle.name, environ=environ)
        except Exception as exc:
            fail(f"{where}: creditgate refuses the rendered settings: {exc}")


def check_config(docs: list[dict[str, Any]], where: str) -> None:
    """The rendered config file is loaded by creditgate's own settings loader."""
    load_rendered(config_text(docs, where), {}, where)


SECRET_SETTINGS = (
    "CREDITGATE_ADMIN_TOKEN",
    "CREDITGATE_UPSTREAM_API_KEY",
    "CREDITGATE_ACCOUNT_HEADER_SECRET",
    "CREDITGATE_VAULT_MASTER_KEY",
    "CREDITGATE_VAULT_PREVIOUS_KEYS",
)
# Stand-ins for values from a Secret that creditgate parses: the vault's master key is 32 bytes, base64.
_KEY_STAND_IN = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="
SECRET_STAND_INS = {
    "CREDITGATE_VAULT_MASTER_KEY": _KEY_STAND_IN,
    "CREDITGATE_VAULT_PREVIOUS_KEYS": f'{{"k0": "{_KEY_STAND_IN}"}}',
}


def pod_environ(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment; a value from a Secret (or any valueFrom) stands in as a placeholder."""
    environ = {}
    for entry in container.get("env", []):
        if "value" in entry:
            environ[entry["name"]] = str(entry["value"])
        else:
            ref = entry.get("valueFrom", {}).get("secretKeyRef", {})
            stand_in = f"from-secret-{ref.get('name')}-{ref.get('key')}".ljust(16, "x")
            environ[entry["name"]] = SECRET_STAND_INS.get(entry["name"], stand_in)
    return environ


ALL_ADDRESSES = ("0.0.0.0", "::", "")


def check_listeners(name: str, pod: dict[str, Any], config: str) -> None:
    """What creditgate listens on, as it reads the rendered config and the container's environment:
    the ops port (probes, metrics) on all addresses in both modes; sidecar: the API on loopback only and
    no API port declared (nothing but the app in the pod reaches /v1 or /admin); standalone: the API on
    all addresses behind its container port."""
    from sidecar.config import is_loopback

    container, is_sidecar = creditgate_container(name, pod)
    settings = load_rendered(config, pod_environ(container), name)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if settings.ops_listen_port is None or ports.get("ops") != settings.ops_listen_port:
        fail(
            f"{name}: the container port ops ({ports.get('ops')}) is not the ops listener's port "
            f"({settings.ops_listen_port})"
        )
    if settings.ops_host not in ALL_ADDRESSES:
        fail(f"{name}: ops_host is {settings.ops_host!r}: the kubelet and Prometheus reach the pod IP")
    if is_flusher(container):  # `creditgate flush` serves the ops listener only
        if set(ports) != {"ops"}:
            fail(f"{name}: the flusher declares only the ops port, has {sorted(ports)}")
        return
    if is_sidecar:
        if not is_loopback(settings.host):
            fail(f"{name}: in sidecar mode the API must listen on loopback only, host is {settings.host!r}")
        if set(ports) != {"ops"}:
            fail(f"{name}: in sidecar mode creditgate declares only the ops port, has {sorted(ports)}")
    else:
        if settings.host not in ALL_ADDRESSES:
            fail(
                f"{name}: in standalone mode the API must listen on all addresses, host is {settings.host!r}"
            )
        if ports.get("creditgate") != settings.port:
            fail(
                f"{name}: the container port creditgate ({ports.get('creditgate')}) is not the API's port "
                f"({settings.port})"
            )


def check_services(docs: list[dict[str, Any]], where: str) -> None:
    """Every Service's targetPort names a port of the pods it selects; every ServiceMonitor endpoint names
    a port of a Service it selects, and scrapes /metrics on the port that targets the ops port."""
    workloads = [
        (doc["spec"]["template"]["metadata"].get("labels", {}), doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}
    ]
    services = [d for d in docs if d["kind"] == "Service"]
    for svc in services:
        name = f"{where}: Service/{svc['metadata']['name']}"
        selector = svc["spec"].get("selector", {})
        selected = [pod for labels, pod in workloads if selector.items() <= labels.items()]
        if not selected:
            fail(f"{name} selects no pod")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for pod in selected:
                declared = container_ports(pod)
                if target not in {p.get("name") for p in declared} | {p["containerPort"] for p in declared}:
                    fail(
                        f"{name}: port {port.get('name')!r} targets {target!r}, which is no container port "
                        "of the pods it selects"
                    )
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        api_service = monitor["metadata"]["name"]  # the chart names the API Service and it <fullname>
        name = f"{where}: ServiceMonitor/{api_service}"
        wanted = monitor["spec"].get("selector", {}).get("matchLabels", {})
        selected = [svc for svc in services if wanted.items() <= svc["metadata"].get("labels", {}).items()]
        if not selected:
            fail(f"{name} selects no Service")
        for endpoint in monitor["spec"].get("endpoints", []):
            for svc in selected:
                by_name = {p.get("name"): p for p in svc["spec"].get("ports", [])}
                port = by_name.get(endpoint.get("port"))
                if port is None:
                    fail(
                        f"{name}: endpoint port {endpoint.get('port')!r} names no port of "
                        f"Service/{svc['metadata']['name']} (it has {sorted(by_name)})"
                    )
                    return
                jobs = {
                    r.get("replacement")
                    for r in endpoint.get("relabelings", [])
                    if r.get("targetLabel") == "job" and r.get("action", "replace") == "replace"
                }
                job = next(iter(jobs)) if len(jobs) == 1 else svc["metadata"]["name"]
                if job != api_service:  # the PrometheusRule's default selector is job="<API Service>"
                    fail(
                        f"{name}: targets of Service/{svc['metadata']['name']} are scraped as job={job!r}, "
                        f"not job={api_service!r}, which the alerts select"
                    )
                if endpoint.get("path", "/metrics") == "/metrics" and port.get("targetPort") != "ops":
                    fail(
                        f"{name}: scrapes /metrics on the Service port {endpoint.get('port')!r}, which "
                        f"targets {port.get('targetPort')!r}, not the ops port that serves /metrics"
                    )


def check_flusher(docs: list[dict[str, Any]], values: dict[str, Any] | None, where: str) -> None:
    """With flusher.separate (and only then) one flusher Deployment, whose container runs `flush`; the
    serving pods' own flusher (as creditgate reads their config and environment) is off exactly then."""
    separate = bool(((values or {}).get("flusher") or {}).get("separate"))
    config = config_text(docs, where)
    flushers = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-flusher")]
    if len(flushers) != int(separate):
        fail(f"{where}: flusher.separate is {separate}, but {len(flushers)} flusher Deployment(s) render")
    for name, pod in pods(docs):
        container, _ = creditgate_container(name, pod)
        deployment = name.removeprefix("Deployment/")
        if deployment in {d["metadata"]["name"] for d in flushers}:
            if container.get("args") != ["flush"] or not is_flusher(container):
                fail(f"{where}: {name} must run `creditgate flush`, runs {container.get('args')}")
            continue
        if container.get("args") != ["serve"]:
            fail(f"{where}: {name} must run `creditgate serve`, runs {container.get('args')}")
        flushing = load_rendered(config, pod_environ(container), name).flusher_enabled
        if flushing == separate:
            fail(
                f"{where}: {name} runs the flusher: {flushing}, with flusher.separate {separate}: the "
                "serving pods must flush exactly when no separate flusher does"
            )


# The chart's `secrets.<value>` and the environment variable each reaches creditgate as.
SECRET_VALUES = {
    "redisUrl": "CREDITGATE_REDIS_URL",
    "databaseUrl": "CREDITGATE_DATABASE_URL",
    "adminToken": "CREDITGATE_ADMIN_TOKEN",
    "upstreamApiKey": "CREDITGATE_UPSTREAM_API_KEY",
    "accountHeaderSecret": "CREDITGATE_ACCOUNT_HEADER_SECRET",
    "vaultMasterKey": "CREDITGATE_VAULT_MASTER_KEY",
    "vaultPreviousKeys": "CREDITGATE_VAULT_PREVIOUS_KEYS",
}


def check_secret_refs(docs: list[dict[str, Any]], values: dict[str, Any] | None, where: str) -> None:
    """Every Secret the values name reaches each creditgate container (serving and flusher) as its
    setting's environment variable, by secretKeyRef to that Secret's key."""
    secrets = (values or {}).get("secrets") or {}
    for name, pod in pods(docs):
        container, _ = creditgate_container(name, pod)
        env = {e["name"]: e for e in container.get("env", [])}
        for value, variable in SECRET_VALUES.items():
            ref = secrets.get(value) or {}
            if not ref.get("name"):
                continue
            got = env.get(variable, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if (got.get("name"), got.get("key")) != (ref["name"], ref.get("key")):
                fail(
                    f"{where}: {name}: secrets.{value} ({ref['name']}/{ref.get('key')}) does not reach "
                    f"{variable} by secretKeyRef (has {got or env.get(variable)})"
                )


def check_documents(docs: list[dict[str, Any]], where: str, values: dict[str, Any] | None) -> None:
    """The checks beyond the schemas, on a list of rendered manifests (and the values they came from)."""
    config = config_text(docs, where)
    for name, pod in pods(docs):
        check_pod(f"{where}: {name}", pod)
        check_listeners(f"{where}: {name}", pod, config)
    check_services(docs, where)
    check_config(docs, where)
    check_flusher(docs, values, where)
    check_secret_refs(docs, values, where)


def render_and_validate(chart: Path, values: dict[str, Any] | None, where: str) -> list[dict[str, Any]]:
    docs = render(chart, values)
    names = [validate(doc, where) for doc in docs]
    check_documents(docs, where, values)
    print(f"  {where}: {len(docs)} manifests valid for Kubernetes {' and '.join(K8S_VERSIONS)}")
    for name in names:
        print(f"    {name}")
    return docs


NEGATIVE = [
    # (what, changes to ci/standalone.yaml, text the render error must contain)
    ("default values (no Secrets named)", None, "secrets.redisUrl.name is required"),
    (
        "no upstream",
        {"config": {"upstream_url": None}, "secrets": {"upstreamApiKey": {"name": ""}}},
        "configure an upstream",
    ),
    ("grace period too short", {"terminationGracePeriodSeconds": 45}, "must exceed"),
    ("chart-managed setting in config", {"config": {"redis_url": "redis://x"}}, "redis_url"),
    (
        "writable root filesystem",
        {"securityContext": {"readOnlyRootFilesystem": False}},
        "readOnlyRootFilesystem",
    ),
    ("unknown value", {"replicas": 3}, "replicas"),
    (
        "standalone account_header without its secret",
        {"config": {"account_header": "x-account-id"}},
        "secrets.accountHeaderSecret",
    ),
    ("ops port equal to the API port", {"opsPort": 8080}, "opsPort and containerPort"),
    (
        "account header secret in the ConfigMap",
        {"config": {"account_header_secret": "x" * 16}},
        "account_header_secret",
    ),
    ("vault master key in the ConfigMap", {"config": {"vault_master_key": "x" * 44}}, "vault_master_key"),
    (
        "earlier vault keys in the ConfigMap",
        {"config": {"vault_previous_keys": {"k0": "x" * 44}}},
        "vault_previous_keys",
    ),
    (
        "a separate flusher in sidecar mode",
        {"mode": "sidecar", "flusher": {"separate": True}},
        "flusher.separate is for standalone mode only",
    ),
    (
        "standalone with no flusher anywhere",
        {"config": {"flusher_enabled": False}},
        "leaves nothing writing the outbox",
    ),
]


def _creditgate(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        c
        for _, pod in pods(docs)
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        if c["name"] == "creditgate"
    )


def _set_env(docs: list[dict[str, Any]], name: str, value: str) -> None:
    env = _creditgate(docs)["env"]
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]


def _set_secret_env(docs: list[dict[str, Any]], name: str, secret: str, key: str) -> None:
    env = _creditgate(docs)["env"]
    ref = {"secretKeyRef": {"name": secret, "key": key}}
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "valueFrom": ref}]


def _first(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def _monitor_port(port: str) -> Callable[[list[dict[str, Any]]], None]:
    def change(docs: list[dict[str, Any]]) -> None:
        _first(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = port

    return change


def _reachable_sidecar_api(docs: list[dict[str, Any]]) -> None:
    _set_env(docs, "CREDITGATE_HOST", "0.0.0.0")  # with the secret, so that creditgate itself accepts it
    _set_secret_env(docs, "CREDITGATE_ACCOUNT_HEADER_SECRET", "app-secrets", "account-header-secret")


def _declared_sidecar_api(docs: list[dict[str, Any]]) -> None:
    _creditgate(docs)["ports"].append({"name": "creditgate", "containerPort": 8080, "protocol": "TCP"})


def _probe_on_api(docs: list[dict[str, Any]]) -> None:
    _creditgate(docs)["readinessProbe"]["httpGet"]["port"] = "creditgate"


def _app_on_ops_port(docs: list[dict[str, Any]]) -> None:
    app = next(c for _, pod in pods(docs) for c in pod["containers"] if c["name"] != "creditgate")
    app["ports"][0]["containerPort"] = 9090


def _plain_vault_key(docs: list[dict[str, Any]]) -> None:
    _set_env(docs, "CREDITGATE_VAULT_MASTER_KEY", SECRET_STAND_INS["CREDITGATE_VAULT_MASTER_KEY"])


def _other_vault_secret(docs: list[dict[str, Any]]) -> None:
    _set_secret_env(docs, "CREDITGATE_VAULT_MASTER_KEY", "creditgate-vault", "another-key")


def _reachable_account_header(docs: list[dict[str, Any]]) -> None:
    _set_env(docs, "CREDITGATE_ACCOUNT_HEADER", "x-account-id")


def _service_target(docs: list[dict[str, Any]]) -> None:
    _first(docs, "Service")["spec"]["ports"][1]["targetPort"] = "metrics"


def _flusher_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-flusher"))


def _flusher_serves(docs: list[dict[str, Any]]) -> None:
    _flusher_deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"] = ["serve"]


def _serving_pods_flush_too(docs: list[dict[str, Any]]) -> None:
    env = _creditgate(docs)["env"]
    env[:] = [e for e in env if e["name"] != "CREDITGATE_FLUSHER_ENABLED"]


def _serving_pods_flush_not(docs: list[dict[str, Any]]) -> None:
    _set_env(docs, "CREDITGATE_FLUSHER_ENABLED", "false")


def _no_flusher(docs: list[dict[str, Any]]) -> None:
    docs[:] = [d for d in docs if not d["metadata"]["name"].endswith("-flusher")]


def _unasked_flusher(docs: list[dict[str, Any]]) -> None:
    docs.append(_flusher_deployment(render(CHART, ci_values("flusher.yaml"))))


def _monitor_without_job(docs: list[dict[str, Any]]) -> None:
    _first(docs, "ServiceMonitor")["spec"]["endpoints"][0].pop("relabelings")


def _flusher_behind_the_api_service(docs: list[dict[str, Any]]) -> None:
    """The flusher's pods labelled as the serving ones (creditgate.selectorLabels), its Service following."""
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    api, flusher = services["cg-creditgate"], services["cg-creditgate-flusher"]
    labels = {**api["spec"]["selector"], "app.kubernetes.io/component": "flusher"}
    _flusher_deployment(docs)["spec"]["template"]["metadata"]["labels"] = labels
    flusher["spec"]["selector"] = labels


# (what, ci values file, change to its rendered manifests, text the failed check must contain)
DOCUMENT_NEGATIVE: list[tuple[str, str, Callable[[list[dict[str, Any]]], None], str]] = [
    ("ServiceMonitor naming no Service port", "monitoring.yaml", _monitor_port("metrics"), "names no port"),
    ("ServiceMonitor scraping the API port", "monitoring.yaml", _monitor_port("http"), "not the ops port"),
    ("Service targetPort naming no container port", "monitoring.yaml", _service_target, "no container port"),
    ("sidecar API on all addresses", "sidecar.yaml", _reachable_sidecar_api, "loopback only"),
    ("sidecar API port declared", "sidecar.yaml", _declared_sidecar_api, "only the ops port"),
    ("app container on the ops port", "sidecar.yaml", _app_on_ops_port, "same port number"),
    ("readiness probe on the API port", "standalone.yaml", _probe_on_api, "on the port named ops"),
    ("vault master key as a plain value", "standalone.yaml", _plain_vault_key, "must come from a Secret"),
    ("vault master key from another Secret", "standalone.yaml", _other_vault_secret, "does not reach"),
    (
        "account_header on all addresses without its secret",
        "standalone.yaml",
        _reachable_account_header,
        "account_header_secret",
    ),
    ("the flusher Deployment running serve", "flusher.yaml", _flusher_serves, "must run `creditgate flush`"),
    ("serving pods flushing beside the flusher", "flusher.yaml", _serving_pods_flush_too, "flush exactly"),
    ("serving pods not flushing, no flusher", "standalone.yaml", _serving_pods_flush_not, "flush exactly"),
    ("no flusher Deployment with separate", "flusher.yaml", _no_flusher, "is True, but 0 flusher"),
    ("a flusher Deployment not asked for", "standalone.yaml", _unasked_flusher, "is False, but 1 flusher"),
    (
        "flusher scraped under a job of its own",
        "flusher.yaml",
        _monitor_without_job,
        "which the alerts select",
    ),
    (
        "flusher pods behind the API Service",
        "flusher.yaml",
        _flusher_behind_the_api_service,
        "no container port of the pods it selects",
    ),
]


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def check_guards() -> None:
    base = yaml.safe_load((CHART / "ci" / "standalone.yaml").read_text())
    for what, changes, expected in NEGATIVE:
        values = None if changes is None else merged(base, changes)
        refused(f"guard '{what}'", lambda v=values: render(CHART, v), helm.HelmError, expected, "rendering")
    for what, values_file, change, expected in DOCUMENT_NEGATIVE:
        values = ci_values(values_file)
        docs = render(CHART, values)
        check_documents(copy.deepcopy(docs), f"ci/{values_file}", values)  # as rendered: passes
        change(docs)
        where = f"ci/{values_file}"
        refused(
            f"check '{what}'",
            lambda d=docs, w=where, v=values: check_documents(d, w, v),
            CheckFailed,
            expected,
            "the checks",
        )


# ---------------------------------------------------------------- alerts (PrometheusRule)

Mutation = Callable[[dict[str, Any]], None]


def _rule0(doc: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = doc["spec"]["groups"][0]["rules"][0]
    return rule


def _endpoint0(doc: dict[str, Any]) -> dict[str, Any]:
    endpoint: dict[str, Any] = doc["spec"]["endpoints"][0]
    return endpoint


# (kind, what, change to the rendered object, text the CRD check must report)
CRD_NEGATIVE: list[tuple[str, str, Mutation, str]] = [
    (
        "PrometheusRule",
        "a rule field the schema lacks",
        lambda d: _rule0(d).update(severity="critical"),
        "unknown field(s) spec.groups[0].rules[0].severity",
    ),
    (
        "PrometheusRule",
        "for: a number",
        lambda d: _rule0(d).update({"for": 300}),
        "spec.groups.0.rules.0.for",
    ),
    (
        "PrometheusRule",
        "for: not a duration",
        lambda d: _rule0(d).update({"for": "5 minutes"}),
        "spec.groups.0.rules.0.for: String should match pattern",
    ),
    (
        "PrometheusRule",
        "a label value that is a number",
        lambda d: _rule0(d)["labels"].update(severity=2),
        "spec.groups.0.rules.0.labels.severity",
    ),
    (
        "PrometheusRule",
        "a group without rules list",
        lambda d: d["spec"]["groups"][0].update(rules={}),
        "rules",
    ),
    (
        "ServiceMonitor",
        "an endpoint field the schema lacks",
        lambda d: _endpoint0(d).update(prot="http"),
        "unknown field(s) spec.endpoints[0].prot",
    ),
    (
        "ServiceMonitor",
        "interval: a number",
        lambda d: _endpoint0(d).update(interval=30),
        "spec.endpoints.0.interval",
    ),
    ("ServiceMonitor", "no selector", lambda d: d["spec"].pop("selector"), "spec.selector: Field required"),
]

# (what, changes to ci/monitoring.yaml, text the render error must contain)
ALERT_VALUES_NEGATIVE: list[tuple[str, dict[str, Any], str]] = [
    (
        "a for: that is no Prometheus duration",
        {"prometheusRule": {"alerts": {"errorRate": {"for": "10 minutes"}}}},
        "/prometheusRule/alerts/errorRate/for",
    ),
    (
        "a ratio given as a percentage",
        {"prometheusRule": {"alerts": {"paymentRequired": {"ratio": 25}}}},
        "/prometheusRule/alerts/paymentRequired/ratio",
    ),
    ("a selector with braces", {"prometheusRule": {"selector": '{job="x"}'}}, "/prometheusRule/selector"),
    (
        "an unknown alert setting",
        {"prometheusRule": {"alerts": {"ledgerDrift": {"threshold": 1}}}},
        "threshold",
    ),
    (
        "every alert disabled",
        {
            "prometheusRule": {
                "alerts": {
                    name: {"enabled": False}
                    for name in (
                        "outboxBacklogAge",
                        "flushFailures",
                        "deadLetters",
                        "ledgerDrift",
                        "reconcileDrift",
                        "reconcileStalled",
                        "errorRate",
                        "redisUnavailable",
                        "paymentRequired",
                    )
                }
            }
        },
        "every alert is disabled",
    ),
]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        fail("promtool not found: apt-get install prometheus (Debian's package; .ci/run installs it)")
    assert path is not None
    return path


def ci_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / name).read_text())
    return values


def rendered_rule(values: dict[str, Any], where: str) -> dict[str, Any]:
    rules = [d for d in render(CHART, values) if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        fail(f"{where}: expected one PrometheusRule, found {len(rules)}")
    return rules[0]


def run_promtool(rule: dict[str, Any], test: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on the rule's groups, or `promtool test rules` with `test` beside them."""
    with tempfile.TemporaryDirectory() as tmp:
        rules_file = Path(tmp) / "creditgate-rules.yaml"  # the name the test file's rule_files gives
        rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
        if test is None:
            command = [promtool(), "check", "rules", rules_file.name]
        else:
            shutil.copy(test, Path(tmp) / "test.yaml")
            command = [promtool(), "test", "rules", "test.yaml"]
        return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300, check=False)


def alerts_of(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}


def check_selectors(rule: dict[str, Any], selector: str, where: str) -> None:
    """Every series an expression reads is a contract metric, selected with the chart's selector."""
    metrics = contract()
    for name, alert in alerts_of(rule).items():
        found = re.findall(r"\b(creditgate_[a-z0-9_]+)(\{[^}]*\})?", alert["expr"])
        if not found:
            fail(f"{where}: {name} reads no creditgate metric: {alert['expr']}")
        for metric, matchers in found:
            if metric not in metrics:
                fail(f"{where}: {name} reads {metric}, which is not in the metric contract (metrics.txt)")
            if not matchers.startswith("{" + selector):
                fail(f"{where}: {name} reads {metric}{matchers} without the selector {{{selector}}}")


def check_alert_tests(rule: dict[str, Any]) -> None:
    """.ci/alerts-test.yaml has, for every alert, a case where it fires and one where it stays quiet."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for name in alerts_of(rule):
        fires = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        if not fires or not quiet:
            fail(f"{ALERTS_TEST.name}: {name} needs a case where it fires and one where it stays quiet")
    result = run_promtool(rule, ALERTS_TEST)
    if result.returncode != 0:
        fail(f"promtool test rules {ALERTS_TEST.name} failed:\n{result.stdout}{result.stderr}")
    print(f"  promtool test rules {ALERTS_TEST.relative_to(ROOT)}: {len(cases)} cases pass")


def check_alert_guards(standalone: dict[str, Any]) -> None:
    """The checks above can fail: bad objects, bad values, bad PromQL and a silenced alert are refused."""
    monitoring_docs = render(CHART, ci_values("monitoring.yaml"))
    objects = {d["kind"]: d for d in monitoring_docs if (d["apiVersion"], d["kind"]) in CRD_MODELS}
    for kind, what, change, expected in CRD_NEGATIVE:
        doc = copy.deepcopy(objects[kind])
        change(doc)
        model = CRD_MODELS[doc["apiVersion"], kind]
        refused(
            f"CRD guard '{kind}: {what}'",
            lambda d=doc, m=model: validate_crd(d, m),
            CheckFailed,
            expected,
            f"the {CRD_SOURCE}",
        )
    base = ci_values("monitoring.yaml")
    for what, changes, expected in ALERT_VALUES_NEGATIVE:
        values = merged(base, changes)
        refused(f"guard '{what}'", lambda v=values: render(CHART, v), helm.HelmError, expected, "rendering")
    broken = copy.deepcopy(standalone)
    _rule0(broken)["expr"] = "sum by (job) (rate(creditgate_requests_total[5m])"
    if run_promtool(broken).returncode == 0:
        fail("promtool check rules accepted an expression with an unclosed parenthesis")
    print("  refused as expected: promtool check rules on an unclosed parenthesis")
    silenced = rendered_rule(
        merged(base, {"prometheusRule": {"alerts": {"outboxBacklogAge": {"thresholdSeconds": 86400}}}}),
        "thresholdSeconds: 86400",
    )
    if run_promtool(silenced, ALERTS_TEST).returncode == 0:
        fail(f"promtool test rules {ALERTS_TEST.name} passed with the backlog alert's threshold at a day")
    print("  refused as expected: promtool test rules with the backlog alert's threshold at a day")


def check_alerts() -> None:
    """The PrometheusRule of both modes: promtool check rules, selectors and contract metrics; the alerts'
    unit tests on the standalone one; the sidecar one the same alerts but for its selector."""
    standalone = rendered_rule(ci_values("monitoring.yaml"), "ci/monitoring.yaml")
    sidecar = rendered_rule(ci_values("sidecar.yaml"), "ci/sidecar.yaml")
    selectors = {"standalone": 'job="cg-creditgate",namespace="billing"', "sidecar": 'namespace="billing"'}
    for (mode, selector), rule in zip(selectors.items(), (standalone, sidecar), strict=True):
        result = run_promtool(rule)
        if result.returncode != 0:
            fail(f"promtool check rules ({mode} mode):\n{result.stdout}{result.stderr}")
        check_selectors(rule, selector, f"{mode} mode")
        print(
            f"  promtool check rules ({mode} mode, selector {{{selector}}}): {len(alerts_of(rule))} alerts ok"
        )
    ours, theirs = alerts_of(standalone), alerts_of(sidecar)
    if set(ours) != set(theirs):
        fail(f"sidecar mode renders other alerts: {sorted(theirs)} vs {sorted(ours)}")
    for name, alert in theirs.items():
        swapped = alert["expr"].replace("{" + selectors["sidecar"], "{" + selectors["standalone"])
        if swapped != ours[name]["expr"]:
            fail(f"{name}: the sidecar expression differs from the standalone one beyond the selector")
    check_alert_tests(standalone)
    check_alert_guards(standalone)


def check_chart() -> None:
    values_files = sorted((CHART / "ci").glob("*.yaml"))
    if not values_files:
        fail("no helm/creditgate/ci/*.yaml values files")
    kinds: set[str] = set()
    for values_file in values_files:
        lint(values_file)
        values = yaml.safe_load(values_file.read_text())
        docs = render_and_validate(CHART, values, f"ci/{values_file.name}")
        kinds.update(d["kind"] for d in docs)
    docs = render_and_validate(EXAMPLE, None, f"example {EXAMPLE.relative_to(ROOT)}")
    kinds.update(d["kind"] for d in docs)
    for kind in (
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ServiceAccount",
    ):
        if kind not in kinds:
            fail(f"no ci values file renders a {kind}")
    check_guards()
    check_alerts()


# ---------------------------------------------------------------- dashboard


def contract() -> dict[str, str]:
    """metric name -> type, from helm/creditgate/dashboards/metrics.txt."""
    metrics: dict[str, str] = {}
    for line in (CHART / "dashboards" / "metrics.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, kind, _labels = line.split()
            metrics[name] = kind
    return metrics


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def check_dashboard() -> None:
    path = CHART / "dashboards" / "creditgate.json"
    dashboard = json.loads(path.read_text())
    metrics = contract()
    used: set[str] = set()
    for text in strings(dashboard):
        for name in re.findall(r"\bcreditgate_[a-z0-9_]+", text):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in metrics:
                used.add(name)
            elif base != name and metrics.get(base) == "histogram":
                used.add(base)
            else:
                fail(f"{path.name} uses {name}, which is not in the metric contract (dashboards/metrics.txt)")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        fail(f"{path.name}: no datasource variable")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        fail(f"{path.name}: duplicate panel ids")
    for panel in panels:
        sources = [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]
        if any((s or {}).get("uid") != "${datasource}" for s in sources):
            fail(f"{path.name}: panel {panel['title']!r} does not use the $datasource variable")
        if not panel.get("targets"):
            fail(f"{path.name}: panel {panel['title']!r} has no query")
    unused = sorted(set(metrics) - used)
    where = path.relative_to(ROOT)
    print(f"  {where}: {len(panels)} panels, {len(used)} of {len(metrics)} contract metrics used")
    if unused:
        print(f"  not charted: {', '.join(unused)}")


def main() -> int:
    checks = {"chart": check_chart, "dashboard": check_dashboard}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        print(f"usage: {sys.argv[0]} {{{'|'.join(checks)}}}", file=sys.stderr)
        return 2
    try:
        checks[sys.argv[1]]()
    except CheckFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
