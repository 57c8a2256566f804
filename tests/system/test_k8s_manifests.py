"""deploy/k8s: every overlay renders, passes the Kubernetes schemas, and keeps the invariants
chatd's termination and scaling rely on (docs/kubernetes.md, "What was proven here").

* ``kubectl kustomize`` renders the base and every overlay under ``deploy/k8s/overlays/``;
* ``kubernetes-validate --strict`` against the oldest (OLDEST) and newest (NEWEST) Kubernetes
  versions chatd's manifests support; only the CRDs chatd uses may lack a schema (a core kind
  with a mistyped apiVersion would otherwise pass with a mere warning);
* over the rendered YAML of each overlay: selectors match the pods' labels, the ScaledObject
  targets the Deployment and no ``replicas`` is set beside it, grace >= preStop +
  shutdown_delay + graceful_timeout + 10, the probes' paths are chatd's (asked of chatd's own
  HTTP endpoints), no ``:latest`` image, the ConfigMap's TOML passes ``chatd --check`` with the
  container's flags, a config change renames the ConfigMap (so the pods roll), the
  PrometheusRule is exactly etc/prometheus/chatd-alerts.yml, the route publishes no probe
  or /metrics;
* the KEDA query, as promtool rule tests on synthetic series: the sum over this namespace's
  pods, and the replica count KEDA derives from it.

Needs kubectl (with its kustomize) on PATH, ``kubernetes-validate`` (test extra) and promtool
(Debian's prometheus, in the Makefile's DEBS); each test skips, saying which is missing.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.config import parse
from chatd.worker.http import HttpEndpoints

pytestmark = [pytest.mark.system]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
BIN = Path(sys.executable).parent
# The Kubernetes versions the manifests are for: 1.30 is the first with the preStop `sleep`
# action on by default (beta; GA in 1.34); 1.37 is the newest kubernetes-validate knows.
OLDEST, NEWEST = "1.30.0", "1.37.0"
# Custom resources chatd's components use: kubernetes-validate has no schema for them (it
# warns); the invariants below check their fields instead.
CRDS = {"ScaledObject", "PodMonitor", "PrometheusRule", "HTTPRoute"}
MARGIN = 10  # seconds of grace beyond preStop + shutdown_delay + graceful_timeout
CHATD_PATHS_PUBLIC = ("/ws", "/api/chat", "/api/tags", "/v1/chat/completions", "/chat/", "/")
CHATD_PATHS_PRIVATE = ("/metrics", "/healthz", "/readyz", "/livez")

Doc = dict[str, Any]


def _need(tool: str) -> str:
    path = shutil.which(tool) or (str(BIN / tool) if (BIN / tool).exists() else None)
    if path is None:
        pytest.skip(f"NOT TESTED: {tool} is not installed (see this module's docstring)")
    return path


def render(directory: Path) -> str:
    kubectl = _need("kubectl")
    r = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, f"kubectl kustomize {directory} failed:\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """The YAML of the base and of every overlay, by name (``base``, ``overlays/example``)."""
    assert OVERLAYS, "no overlay under deploy/k8s/overlays"
    out = {"base": render(K8S / "base")}
    for overlay in OVERLAYS:
        out[f"overlays/{overlay.name}"] = render(overlay)
    return out


def docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(objs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def overlay_docs(rendered: dict[str, str]) -> Iterator[tuple[str, list[Doc]]]:
    for name, text in rendered.items():
        if name.startswith("overlays/"):
            yield name, docs(text)


# -- rendering and schemas -------------------------------------------------------------------


def test_every_overlay_uses_every_component(rendered: dict[str, str]) -> None:
    components = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
    assert components == ["gateway", "keda", "monitoring", "redis"]
    example = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    assert sorted(Path(c).name for c in example["components"]) == components
    kinds = {d["kind"] for d in docs(rendered["overlays/example"])}
    assert CRDS | {"Deployment", "Service", "PodDisruptionBudget", "StatefulSet"} <= kinds


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_schemas_strict(rendered: dict[str, str], version: str, tmp_path: Path) -> None:
    validate = _need("kubernetes-validate")
    for name, text in rendered.items():
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(text)
        r = subprocess.run(
            [validate, "--strict", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{name} against Kubernetes {version}:\n{out}"
        unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
        assert unknown <= CRDS, f"{name}: no schema for {unknown - CRDS}: a mistyped apiVersion?"
        passed = len(re.findall(r"^INFO .* passed for resource", out, re.M))
        assert passed == len(docs(text)) - len([d for d in docs(text) if d["kind"] in CRDS]), out


def test_the_schema_check_catches_a_wrong_field(rendered: dict[str, str], tmp_path: Path) -> None:
    """The check above can fail: a misspelt field under preStop, or sleep before 1.29."""
    validate = _need("kubernetes-validate")
    deployment = one(docs(rendered["base"]), "Deployment", "chatd")
    hook = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]
    hook["sleep"] = {"second": 5}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    r = subprocess.run([validate, "--strict", "-k", NEWEST, str(path)], capture_output=True)
    assert r.returncode != 0
    hook["sleep"] = {"seconds": 5}
    path.write_text(yaml.safe_dump(deployment))
    r = subprocess.run([validate, "--strict", "-k", "1.28.0", str(path)], capture_output=True)
    assert r.returncode != 0, "1.28 has no preStop sleep: the oldest version must be >= 1.30"


# -- invariants over each overlay ------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_pods(rendered: dict[str, str]) -> None:
    for name, objs in overlay_docs(rendered):
        workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
        pods = {
            o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in workloads
        }
        for w in workloads:
            sel = w["spec"]["selector"]["matchLabels"]
            assert _matches(sel, pods[w["metadata"]["name"]]), (name, w["metadata"]["name"])
            for spread in w["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
                assert spread["labelSelector"]["matchLabels"] == sel, name
        for svc in (o for o in objs if o["kind"] == "Service"):
            hits = [w for w, labels in pods.items() if _matches(svc["spec"]["selector"], labels)]
            assert len(hits) == 1, (name, svc["metadata"]["name"], hits)
            assert svc["spec"].get("sessionAffinity", "None") == "None", "clients resume anywhere"
        chatd_pods = pods["chatd"]
        for kind in ("PodDisruptionBudget", "PodMonitor"):
            sel = one(objs, kind, "chatd")["spec"]["selector"]["matchLabels"]
            assert _matches(sel, chatd_pods), (name, kind)
        # The alert rules select job="chatd": the PodMonitor's jobLabel must give that.
        job_label = one(objs, "PodMonitor", "chatd")["spec"]["jobLabel"]
        assert chatd_pods[job_label] == "chatd"


def test_keda_owns_the_replicas_and_scales_on_connections_and_cpu(
    rendered: dict[str, str],
) -> None:
    for name, objs in overlay_docs(rendered):
        so = one(objs, "ScaledObject", "chatd")
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment", name
        target = one(objs, "Deployment", ref["name"])
        assert target["metadata"].get("namespace") == so["metadata"].get("namespace")
        assert "replicas" not in target["spec"], f"{name}: replicas beside a ScaledObject"
        assert so["spec"]["minReplicaCount"] >= 2  # one pod drains while another serves
        triggers = {t["type"]: t for t in so["spec"]["triggers"]}
        assert set(triggers) == {"prometheus", "cpu"}
        query = triggers["prometheus"]["metadata"]["query"]
        assert "chatd_connections" in query and "queue" not in query
        assert f'namespace="{so["metadata"]["namespace"]}"' in query, query
        # The cpu trigger is a percentage of the request: there must be one.
        container = target["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["cpu"]


def _chatd(objs: list[Doc]) -> tuple[Doc, Doc]:
    deployment = one(objs, "Deployment", "chatd")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def _config(objs: list[Doc], pod: Doc) -> tuple[str, Doc]:
    """The chatd.toml text the pod mounts (the ConfigMap its volume names)."""
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    return cm["data"]["chatd.toml"], cm


def _prestop_seconds(container: Doc) -> float:
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]  # the pre-1.30 form: ["/bin/sleep", "5"]
    assert Path(command[0]).name == "sleep", command
    return float(command[1])


def test_rollout_and_termination_timings(rendered: dict[str, str]) -> None:
    for name, objs in overlay_docs(rendered):
        deployment, container = _chatd(objs)
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0), name
        pod = deployment["spec"]["template"]["spec"]
        text, _ = _config(objs, pod)
        server = parse(text).server
        need = _prestop_seconds(container) + server.shutdown_delay + server.graceful_timeout
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= need + MARGIN, f"{name}: grace {grace} < {need} + {MARGIN}"


def _get(e: HttpEndpoints, path: str) -> Response:
    answer: Any = e.process_request(None, Request(path, Headers()))  # type: ignore[arg-type]
    if not isinstance(answer, Response):
        answer = asyncio.run(answer)
    assert isinstance(answer, Response)
    return answer


def test_probes_are_chatds_endpoints_and_not_readyz(rendered: dict[str, str]) -> None:
    async def alive() -> tuple[bool, str]:
        return True, ""

    for name, objs in overlay_docs(rendered):
        _, container = _chatd(objs)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        paths = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["port"] in ports or get["port"] in ports.values(), (name, probe)
            paths[probe] = get["path"]
        # Liveness must see a hung master (/livez asks it); readiness must not follow the
        # shared backends (/readyz would empty every pod's endpoints in an Ollama outage).
        assert paths == {
            "startupProbe": "/livez",
            "livenessProbe": "/livez",
            "readinessProbe": "/healthz",
        }, name
        text, _ = _config(objs, one(objs, "Deployment", "chatd")["spec"]["template"]["spec"])
        e = HttpEndpoints(
            parse(text),
            ready=lambda: (True, ""),
            serving=lambda: True,
            connections=lambda: 0,
            alive=alive,
        )
        for path in set(paths.values()):
            assert _get(e, path).status_code == 200, f"chatd does not serve {path}"
        # The liveness probe's timeout covers /livez's wait for the master.
        assert container["livenessProbe"]["timeoutSeconds"] > 2


def test_security_context_and_images(rendered: dict[str, str]) -> None:
    for name, objs in overlay_docs(rendered):
        for w in (o for o in objs if o["kind"] in ("Deployment", "StatefulSet")):
            pod = w["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, (name, w["metadata"]["name"])
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                image = c["image"]
                tag = image.rpartition("/")[2].partition("@")[0].partition(":")[2]
                assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: {image}"


def _expand(objs: list[Doc], container: Doc, arg: str) -> str:
    """An argument with the kubelet's ``$(VAR)`` expansion from the container's env."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = one(objs, "Secret", ref["name"])
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg)


def _check(objs: list[Doc], toml_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``chatd --check`` of the ConfigMap's TOML with the container's own flags."""
    _, container = _chatd(objs)
    conf = tmp_path / "chatd.toml"
    conf.write_text(toml_text)
    args = [_expand(objs, container, a) for a in container["args"]]
    args[args.index("--config") + 1] = str(conf)
    assert not any("$(" in a for a in args), args
    return subprocess.run(
        [str(BIN / "chatd"), *args, "--check"], capture_output=True, text=True, timeout=60
    )


def test_the_configmap_passes_chatd_check_with_the_containers_flags(
    rendered: dict[str, str], tmp_path: Path
) -> None:
    for name, objs in overlay_docs(rendered):
        deployment, container = _chatd(objs)
        text, _ = _config(objs, deployment["spec"]["template"]["spec"])
        r = _check(objs, text, tmp_path)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        # workers = 0 counts the CPU limit (cgroup quota); without one, the node's CPUs.
        workers = parse(text).server.workers
        assert workers > 0 or container["resources"]["limits"]["cpu"], name
        assert "redis://" in _expand(objs, container, "$(CHATD_STORE)"), "pods share one store"
        # ... and the check can fail: an unknown key is refused (exit 78).
        bad = _check(objs, text.replace("[server]", "[server]\nbogus = 1", 1), tmp_path)
        assert bad.returncode == 78 and "server.bogus" in bad.stderr


def test_a_config_change_renames_the_configmap(tmp_path: Path) -> None:
    """The ConfigMap's name carries a hash of chatd.toml, and the Deployment follows it, so a
    changed config is a new pod template: a rollout, not pods running on a stale file."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "deploy", copy / "deploy")
    shutil.copytree(ROOT / "etc", copy / "etc")

    def names() -> tuple[str, str]:
        objs = docs(render(copy / "deploy" / "k8s" / "base"))
        cm = one(objs, "ConfigMap")["metadata"]["name"]
        pod = one(objs, "Deployment", "chatd")["spec"]["template"]["spec"]
        return cm, next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]

    before, used = names()
    assert before == used and before.startswith("chatd-config-")
    toml = copy / "etc" / "chatd" / "chatd.toml"
    toml.write_text(toml.read_text().replace("graceful_timeout = 30.0", "graceful_timeout = 20.0"))
    after, used = names()
    assert after != before and after == used
    # The base's ConfigMap is the shipped file itself (one source for hosts and clusters).
    cm = one(docs(render(K8S / "base")), "ConfigMap")
    assert cm["data"]["chatd.toml"] == (ROOT / "etc" / "chatd" / "chatd.toml").read_text()


def test_redis_keeps_every_acknowledged_message(rendered: dict[str, str]) -> None:
    for name, objs in overlay_docs(rendered):
        redis = one(objs, "StatefulSet", "chatd-redis")
        args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        opts = dict(zip(args[::2], args[1::2], strict=True))
        assert opts["--appendonly"] == "yes" and opts["--maxmemory-policy"] == "noeviction", name
        assert redis["spec"]["volumeClaimTemplates"], "the AOF needs a volume"


def test_the_prometheusrule_is_the_alert_rules_file() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prometheusrule.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    committed = K8S / "components" / "monitoring" / "prometheusrule.yaml"
    assert committed.read_text() == r.stdout, "regenerate it: make k8s-rules"
    rules = yaml.safe_load((ROOT / "etc" / "prometheus" / "chatd-alerts.yml").read_text())
    assert yaml.safe_load(committed.read_text())["spec"]["groups"] == rules["groups"]


def _routed(rule_matches: list[Doc], path: str) -> bool:
    for m in rule_matches:
        kind, value = m["path"]["type"], m["path"]["value"]
        if kind == "Exact" and path == value:
            return True
        prefix = value.rstrip("/")
        if kind == "PathPrefix" and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def test_the_route_publishes_the_client_paths_only(rendered: dict[str, str]) -> None:
    for name, objs in overlay_docs(rendered):
        route = one(objs, "HTTPRoute", "chatd")
        service = one(objs, "Service", "chatd")
        ports = {p["port"] for p in service["spec"]["ports"]}
        matches = [m for rule in route["spec"]["rules"] for m in rule["matches"]]
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                assert ref["name"] == "chatd" and ref["port"] in ports, name
        for path in CHATD_PATHS_PUBLIC:
            assert _routed(matches, path), f"{name}: {path} is not routed"
        for path in CHATD_PATHS_PRIVATE:
            assert not _routed(matches, path), f"{name}: {path} is published"


# -- the KEDA query, evaluated by promtool ----------------------------------------------------


def test_keda_query_with_promtool(rendered: dict[str, str], tmp_path: Path) -> None:
    """The connections trigger's query on synthetic scrapes: three chatd pods in the overlay's
    namespace (their sum counts) and one in another namespace (ignored); KEDA's AverageValue
    replica count is ceil(value / threshold)."""
    promtool = _need("promtool")
    for name, objs in overlay_docs(rendered):
        so = one(objs, "ScaledObject", "chatd")
        namespace = so["metadata"]["namespace"]
        trigger = next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")
        query, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
        per_pod = [1500, 2500, 2100]
        want = sum(per_pod)
        rules = {
            "groups": [
                {
                    "name": "keda",
                    "rules": [
                        {"record": "keda:connections", "expr": query},
                        {"record": "keda:replicas", "expr": f"ceil(({query}) / {threshold:g})"},
                    ],
                }
            ]
        }
        labels = f'namespace="{namespace}",job="chatd"'
        series = [
            {"series": f'chatd_connections{{{labels},pod="chatd-{i}"}}', "values": f"{n}x10"}
            for i, n in enumerate(per_pod)
        ]
        series.append(
            {
                "series": 'chatd_connections{namespace="elsewhere",pod="x",job="chatd"}',
                "values": "9999x10",
            }
        )
        tests = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": series,
                    "promql_expr_test": [
                        {
                            "expr": "keda:connections",
                            "eval_time": "5m",
                            "exp_samples": [{"labels": "keda:connections", "value": want}],
                        },
                        {
                            "expr": "keda:replicas",
                            "eval_time": "5m",
                            "exp_samples": [
                                {"labels": "keda:replicas", "value": math.ceil(want / threshold)}
                            ],
                        },
                    ],
                }
            ],
        }
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
        r = subprocess.run(
            [promtool, "test", "rules", "tests.yml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        assert math.ceil(want / threshold) == 4  # 6,100 connections at 2,000 per pod


def test_keda_query_check_can_fail(tmp_path: Path) -> None:
    """promtool really compares: a wrong expected value fails the rule test."""
    promtool = _need("promtool")
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum(x)"}]}]})
    )
    tests = {
        "rule_files": ["rules.yml"],
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": "x", "values": "1x5"}],
                "promql_expr_test": [
                    {"expr": "r", "eval_time": "2m", "exp_samples": [{"value": 2}]}
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True)
    assert r.returncode != 0
