"""infra/ as KubeRay, Kubernetes and Ray will read it, and the safe defaults of issue 7, checked without a cluster.

No Kubernetes here, so every manifest is parsed and held to what KubeRay needs (apiVersion ray.io/v1, a head
group and worker groups, pod templates with images and resources), to one Ray version everywhere (the pin
in requirements/constraints.txt == rayVersion == the image tags == the Dockerfile's FROM), to entrypoints
that name files that exist, and to the safety rules: the dashboard / Jobs API on loopback and never behind
a public Service (ShadowRay, CVE-2023-48022), credentials only from Secrets, MLflow with PostgreSQL, S3 and
authentication. The runtime env's excludes are checked with Ray's own packaging code on this checkout.
"""

from __future__ import annotations

import ast
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
PINS = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
RAY = PINS["ray"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in infra/ (documents with apiVersion and kind)."""
    out = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, doc))
    return out


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in manifests() if d["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    def name(path: Path, doc: dict) -> str:
        return f"{path.name}:{doc['metadata'].get('name') or doc['metadata']['generateName']}"

    return ([(name(p, d), d["spec"]) for p, d in of_kind("RayCluster")]
            + [(name(p, d), d["spec"]["rayClusterSpec"]) for p, d in of_kind("RayJob")])


def containers(obj: Any) -> list[dict]:
    """Every container (and init container) anywhere under obj."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(obj, list):
        for item in obj:
            found += containers(item)
    return found


def dockerfile(name: str) -> tuple[str, dict[str, str]]:
    """(resolved FROM image, ARG defaults) of infra/docker/<name>."""
    text = (INFRA / "docker" / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    image = re.search(r"^FROM (\S+)", text, re.M).group(1)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image), args


def test_every_yaml_in_infra_parses_and_the_expected_objects_exist() -> None:
    for path in INFRA.rglob("*.yaml"):
        list(yaml.safe_load_all(path.read_text()))
    kinds = {d["kind"] for _, d in manifests()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=[name for name, _ in ray_cluster_specs()])
def test_ray_cluster_spec_has_what_kuberay_needs(name: str, spec: dict) -> None:
    assert spec["rayVersion"] == RAY, f"{name}: rayVersion {spec['rayVersion']} != ray=={RAY} in constraints.txt"
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # strings: KubeRay rejects numbers here
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(g))]
    assert gpu_groups and len(gpu_groups) < len(groups), f"{name}: wants a CPU and a GPU worker group"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        for c in containers(group):
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
            flavor = "gpu" if group in gpu_groups else "cpu"
            assert c["image"].endswith(f":{RAY}-py311-{flavor}"), f"{name}/{group['groupName']}: {c['image']}"


def test_images_match_the_ray_pin_and_the_dockerfile() -> None:
    base, args = dockerfile("Dockerfile")
    assert args["RAY_VERSION"] == RAY
    assert base == f"rayproject/ray:{RAY}-py311-cpu"
    ray_images = {c["image"] for _, spec in ray_cluster_specs() for c in containers(spec)}
    launcher = yaml.safe_load((INFRA / "launcher" / "cluster.yaml").read_text())
    ray_images |= {launcher["docker"]["image"]} | {t["docker"]["worker_image"] for t in launcher["available_node_types"].values()
                                                    if "docker" in t}
    repos = {image.rsplit(":", 1)[0] for image in ray_images}
    assert len(repos) == 1, f"one project image for head and workers: {repos}"
    # every tag is the Dockerfile's FROM tag for a flavor it builds
    flavors = {base.split(":")[1].replace("-cpu", f"-{f}") for f in ("cpu", "gpu")}
    assert {image.rsplit(":", 1)[1] for image in ray_images} == flavors


def test_dockerfiles_install_with_the_constraints() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install -c requirements/constraints\.txt \.", text)
    assert f"torch=={PINS['torch']}" in text
    assert "pip check" in text
    mlflow = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert "-c /tmp/constraints.txt" in mlflow and "psycopg" in mlflow and "boto3" in mlflow
    assert "hftlab-mlflow-serve" in mlflow.split("ENTRYPOINT")[1]
    for context_ignore in ("Dockerfile.dockerignore", "mlflow.Dockerfile.dockerignore"):
        assert {".git", ".venv", "outputs"} <= set((INFRA / "docker" / context_ignore).read_text().split())


def test_ray_job_manifests() -> None:
    workdir = re.search(r"^WORKDIR (\S+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    runtime_env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    jobs = of_kind("RayJob")
    assert jobs
    for path, job in jobs:
        spec = job["spec"]
        assert job["apiVersion"] == "ray.io/v1"
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
        assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python"
        script = Path(argv[1].replace(workdir, str(REPO), 1))
        assert script.parent == REPO / "jobs" and script.is_file(), f"{path.name}: entrypoint names {argv[1]}"
        config = Path(argv[argv.index("--config") + 1].replace(workdir, str(REPO), 1))
        assert config.is_file(), f"{path.name}: --config {config}"
        # the job's env is the submitter's runtime env: one source of truth
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == runtime_env["env_vars"]


def test_nothing_is_exposed_outside_the_cluster() -> None:
    for path, doc in manifests():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{path.name}: {doc['kind']}"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']['name']}"
        for c in containers(doc):
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{path.name}: hostPort"
        assert "hostNetwork: true" not in yaml.safe_dump(doc)
    for _, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_credentials_come_from_secrets_only() -> None:
    assert not of_kind("Secret"), "Secrets are created by hand (docs/cluster.md), never committed"
    for path, doc in manifests():
        for c in containers(doc):
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{path.name}: {c['name']} sets {env['name']} inline"
                inline_password = re.search(r"://[^/:@\s]+:[^$@\s][^@\s]*@", str(env.get("value", "")))
                assert not inline_password, f"{path.name}: password in a URI"


def test_mlflow_deployment_postgres_s3_and_auth() -> None:
    [deployment] = [d for _, d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    assert server["image"].endswith(f":{PINS['mlflow']}")
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    serve = (INFRA / "mlflow" / "serve.sh").read_text()
    assert "--app-name basic-auth" in serve and '--host "${MLFLOW_HOST:-127.0.0.1}"' in serve
    assert {"postgres", "minio"} <= {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                                     for _, d in manifests() if d["kind"] in ("Deployment", "StatefulSet")}


def test_runtime_env_keeps_venv_git_and_outputs_out_of_the_upload(tmp_path: Path) -> None:
    """Ray's own packaging of this checkout with our excludes (.gitignore not consulted: a fresh clone may lack one)."""
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert env["env_vars"]["HFTLAB_STORAGE_PATH"].startswith("/")
    # a decoy tree beside the real checkout: what must never travel
    decoys = [".venv/lib/python3.11/site-packages/torch/lib.so", ".git/objects/pack/x.pack", "mlruns/0/meta.yaml",
              "mlartifacts/1/model.safetensors", "outputs/align-abc/model.safetensors", "checkpoints/step-1/optimizer.pt",
              "mlflow.db", "test-artifacts/a.png"]
    keep = ["jobs/run.py", "configs/smoke.yaml", "platform/hftlab/data/records.py", "platform/hftlab/models/tiny.py"]
    for rel in decoys + keep:
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_text("x")
    create_package(str(tmp_path / "tree"), tmp_path / "decoy.zip", include_gitignore=False, excludes=env["excludes"])
    names = set(zipfile.ZipFile(tmp_path / "decoy.zip").namelist())
    assert set(keep) <= names and not names & set(decoys), names

    for module in ["."] + env["py_modules"]:
        target = tmp_path / f"{Path(module).name or 'wd'}.zip"
        create_package(str(REPO / module), target, include_gitignore=False, excludes=env["excludes"])
        names = zipfile.ZipFile(target).namelist()
        assert not [n for n in names if n.startswith((".venv/", ".git/", "outputs/", "mlruns/"))]
        assert target.stat().st_size < 5 * 2**20, f"{module}: {target.stat().st_size} bytes uploaded per job"
    assert "data/records.py" in zipfile.ZipFile(tmp_path / "hftlab.zip").namelist()  # hftlab.data is code, not a data cache


def _calls(paths: list[Path]) -> list[tuple[Path, ast.Call]]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                out.append((path, node))
    return out


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


SOURCES = sorted((REPO / "platform").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py"))


def test_jobs_call_a_bare_ray_init() -> None:
    """A job must not override the submitter's runtime_env (or address): `ray.init()` with no arguments.

    jobs/bench/ is left out on purpose: the benchmarks start their own local Ray with a set CPU count.
    """
    for path, call in _calls(sorted((REPO / "jobs").glob("*.py"))):
        if _name(call) == "ray.init":
            assert not call.args and not call.keywords, f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}"


def test_torch_load_is_weights_only_and_no_remote_code_by_default() -> None:
    for path, call in _calls(SOURCES):
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        if _name(call) == "torch.load":
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
        for k in call.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), where
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args[len(node.args.args) - len(node.args.defaults):] + node.args.kwonlyargs
                defaults = node.args.defaults + node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code" and default is not None:  # None: keyword-only, no default
                        assert isinstance(default, ast.Constant) and default.value is False, f"{path}:{node.lineno}"
    from hftlab.config import load_config

    assert load_config(REPO / "configs" / "quickstart.yaml").base.trust_remote_code is False


START_FILES = [*sorted(INFRA.rglob("*.sh")), *sorted(INFRA.rglob("*.yaml")), *sorted((REPO / "docs").glob("*.md")),
               REPO / "README.md"]


def commands(path: Path) -> str:
    """The command text of a file: code blocks and `spans` of Markdown, non-comment lines of scripts and YAML."""
    text = re.sub(r"\\\n", " ", path.read_text())  # shell continuation lines
    if path.suffix == ".md":
        return "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("path", START_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_what_starts_ray_or_mlflow_binds_loopback(path: Path) -> None:
    """Every `ray start --head` names --dashboard-host 127.0.0.1; no `mlflow server|ui` binds other than 127.0.0.1 by default.

    (MLflow's own default host is 127.0.0.1; a --host must be that, or ${MLFLOW_HOST:-127.0.0.1}.)
    """
    text = commands(path)
    for command in re.findall(r"ray start --head[^\n`]*", text):
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1", command), f"{path.name}: {command}"
    for command in re.findall(r"mlflow (?:server|ui)\b[^\n`]*", text):
        for host in re.findall(r"(?:--host|-h)[= ](\S+)", command):
            assert host.strip('"') in ("127.0.0.1", "${MLFLOW_HOST:-127.0.0.1}"), f"{path.name}: {command}"
    assert not re.search(r"--dashboard-host[= ]0\.0\.0\.0", text)
