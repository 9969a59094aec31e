"""deploy/: the Kubernetes manifests, the compose file, the Dockerfile and the systemd unit are checked here.

What is checked and how, honestly:

- Kubernetes: every manifest is validated against the Kubernetes JSON schemas by ``kubernetes-validate``
  (offline, the schemas ship with it), and ``kubectl apply --dry-run=client`` runs when kubectl can reach
  an API server (it needs one even for a client-side dry run; CI has none, so that test is skipped there).
  On top, the checks a schema cannot make: probes on the port given to ``--metrics-port``, the shard
  count equal to the replicas, references to the ConfigMap and Secret that exist, an image tag.
- Compose: parsed and checked the same way (``docker compose config`` runs when the compose plugin is there).
- Dockerfile: built only where a Docker daemon answers (not on this project's machines); otherwise linted
  (a pinned base, the extras it installs exist, ENTRYPOINT is the console script) and its entrypoint
  command, ``atm-watch --help``, is run from this environment.
- Every ``atm-watch`` command line in these files is parsed by atm-watch's own parser.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from atm.watcher.cli import watch_parser

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRICS_PORT = 9464
#: The Kubernetes version whose schemas the manifests are checked against.
K8S_VERSION = "1.30.0"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str) -> dict[str, Any]:
    [doc] = [d for d in manifests() if d["kind"] == kind]
    return doc


def parses_as_atm_watch(args: list[str]) -> Any:
    """atm-watch's own parser reads the arguments (an unknown flag or a bad value fails here, not in a pod)."""
    try:
        return watch_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"atm-watch refuses {args}: exit {exc.code}")


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# --------------------------------------------------------------------------- Kubernetes


def test_every_manifest_has_the_essential_fields() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "ConfigMap", "Secret"}
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        assert "spec" in d or "data" in d or "stringData" in d, d["kind"]


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install 'atm[test]' brings kubernetes-validate")
    for d in manifests():
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{d['kind']} {d['metadata']['name']}: {exc.message} at {list(exc.path)}")


def _kubectl_has_server() -> bool:
    if shutil.which("kubectl") is None:
        return False
    done = subprocess.run(["kubectl", "version", "--request-timeout=3s"], capture_output=True, text=True, check=False)
    return done.returncode == 0 and "Server Version" in done.stdout


@pytest.mark.skipif(not _kubectl_has_server(), reason="kubectl --dry-run=client needs an API server to reach; none here")
def test_kubectl_accepts_the_manifests() -> None:
    done = subprocess.run(["kubectl", "apply", "--dry-run=client", "-f", str(DEPLOY / "k8s")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_statefulset_runs_one_shard_per_replica_with_probes_on_the_metrics_port() -> None:
    sts = one("StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    # Shards = replicas, k from the pod's ordinal (HOSTNAME, set by Kubernetes).
    assert int(env["ATM_SHARDS"]["value"]) == spec["replicas"]
    assert not any(a.startswith("--shard") for a in c["args"])
    args = parses_as_atm_watch([re.sub(r"\$\((\w+)\)", "x", a) for a in c["args"]])
    assert args.metrics_port == METRICS_PORT and args.experiment and args.workers >= 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert (get["path"], port) == (path, METRICS_PORT), probe
    # An image with a tag, never latest.
    image = c["image"]
    assert ":" in image and not image.endswith(":latest")
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # The governing service selects these pods.
    svc = one("Service")
    assert spec["serviceName"] == svc["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items() and svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in (METRICS_PORT, "metrics")


def test_the_statefulset_uses_what_the_configmap_and_secret_hold() -> None:
    sts, cm, secret = one("StatefulSet"), one("ConfigMap"), one("Secret")
    pod = sts["spec"]["template"]["spec"]
    [c] = pod["containers"]
    for e in c["env"]:
        ref = e.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            assert ref["configMapKeyRef"]["name"] == cm["metadata"]["name"] and ref["configMapKeyRef"]["key"] in cm["data"]
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"] and ref["secretKeyRef"]["key"] in secret["stringData"]
    assert any(e["name"] == "ATM_KEY" and "secretKeyRef" in e.get("valueFrom", {}) for e in c["env"])
    # The policy file the daemon is given is the one the ConfigMap mounts.
    [vol] = [v for v in pod["volumes"] if "configMap" in v]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    [item] = vol["configMap"]["items"]
    assert item["key"] in cm["data"]
    policy_arg = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--policy="))
    assert policy_arg == f"{mount['mountPath']}/{item['path']}"
    # The shipped Secret holds no usable key: the daemon refuses it until one is set.
    assert len(secret["stringData"]["ATM_KEY"]) < 16


def test_the_configmap_policy_is_deploy_policy_yaml_and_loads() -> None:
    from atm.policies import load_policy
    from atm.watcher.rules import Thresholds

    text = one("ConfigMap")["data"]["policy.yaml"]
    assert text == (DEPLOY / "policy.yaml").read_text()
    policy = load_policy(str(DEPLOY / "policy.yaml"), known_thresholds=Thresholds.names())
    assert policy.name == "team"


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?message}, with no variable set."""
    return re.sub(r"\$\{\w+(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(1) or "x" * 16, text)


def test_compose_runs_mlflow_on_postgres_and_the_daemon_against_it() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"postgres", "mlflow", "atm-watch"}
    mlflow_cmd = services["mlflow"]["command"]
    assert any(a.startswith("--backend-store-uri=postgresql://") and "@postgres:" in a for a in mlflow_cmd)
    artifacts = next(a.split("=", 1)[1] for a in mlflow_cmd if a.startswith("--artifacts-destination="))
    assert any(artifacts.startswith(v.split(":")[1]) for v in services["mlflow"]["volumes"])
    assert "psycopg2-binary" in services["mlflow"]["build"]["args"]["EXTRA_PACKAGES"]
    # `mlflow server` accepts these options (click parses them; nothing is started), and lets the daemon's
    # Host header through its DNS-rebinding check.
    from mlflow.cli import server

    server.make_context("server", list(mlflow_cmd[1:]))
    hosts = next(a.split("=", 1)[1] for a in mlflow_cmd if a.startswith("--allowed-hosts=")).split(",")
    assert "mlflow:5000" in hosts
    watch = services["atm-watch"]
    args = parses_as_atm_watch([_interpolate(a) for a in watch["command"]])
    assert args.metrics_port == METRICS_PORT
    assert watch["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "ATM_KEY" in watch["environment"]
    assert f":{METRICS_PORT}/healthz" in " ".join(watch["healthcheck"]["test"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in doc["volumes"], vol
            if src.startswith("."):
                assert (DEPLOY / src).exists(), vol
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert "image" in svc and not svc["image"].endswith(":latest")


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0
                    if shutil.which("docker") else True, reason="the docker compose plugin is not installed here")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, env={"ATM_KEY": "k" * 32, "PATH": "/usr/bin:/usr/local/bin"}, check=False)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, rest) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_lints() -> None:
    import json

    steps = dockerfile()
    assert steps[0][0] == "FROM" or (steps[0][0] == "ARG" and any(w == "FROM" for w, _ in steps))
    [base] = [rest for w, rest in steps if w == "FROM"]
    image, _, tag = base.partition(":")
    assert image.endswith("python") and tag and tag != "latest" and "slim" in tag, base
    # It installs the daemon's extras, which exist, and neither torch nor the embedded LLM.
    [install] = [rest for w, rest in steps if w == "RUN" and "pip install" in rest]
    wanted = re.search(r'"\.\[([^\]]+)\]"', install).group(1).split(",")
    assert set(wanted) == {"mlflow", "wandb", "llm", "server"} and set(wanted) <= set(extras())
    assert not {"torch", "embedded"} & set(wanted)
    # ENTRYPOINT is the console script, in exec form (so SIGTERM reaches atm-watch, not a shell).
    [entry] = [rest for w, rest in steps if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["atm-watch"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["atm-watch"] == "atm.watcher.cli:watch_main"
    [expose] = [rest for w, rest in steps if w == "EXPOSE"]
    assert int(expose) == METRICS_PORT
    assert any(w == "USER" and rest not in ("root", "0") for w, rest in steps)
    # What it copies is what the build context lets in (.dockerignore keeps .venv and runs out).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for w, rest in steps:
        if w == "COPY":
            for src in rest.split()[:-1]:
                assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src
    assert "server" in extras() and any("prometheus" in r for r in extras()["server"])


def test_the_images_entrypoint_command_runs() -> None:
    exe = Path(sys.executable).parent / "atm-watch"
    assert exe.exists(), "atm-watch is installed with the package (pip install -e .)"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for flag in ("--workers", "--shard", "--metrics-port", "--health-file", "--experiment"):
        assert flag in done.stdout


def _docker_daemon() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon here: the Dockerfile is linted and its entrypoint run instead")
def test_the_image_builds_and_its_entrypoint_answers() -> None:
    tag = "atm-watch:test"
    done = subprocess.run(["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "--metrics-port" in done.stdout


# --------------------------------------------------------------------------- systemd


def test_the_systemd_unit_runs_a_command_atm_watch_accepts() -> None:
    unit = (DEPLOY / "atm-watch.service").read_text()
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", unit, flags=re.MULTILINE))
    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, flags=re.MULTILINE)
    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start))
    assert argv[0].endswith("/atm-watch")
    args = parses_as_atm_watch(argv[1:])
    assert args.experiment == env["ATM_EXPERIMENT"] and args.health_file and args.metrics_port == METRICS_PORT
    assert "ATM_KEY_FILE" in env
