"""infra/'s Kubernetes manifests against the schemas a cluster holds them to, offline.

tests/test_infra.py checks what hftlab needs of the manifests; this checks that a cluster accepts them at all:
core kinds against Kubernetes' own schemas (kubernetes-validate's bundled copy, strict: an unknown field fails,
as `kubectl apply`'s default strict field validation fails it), RayCluster and RayJob against KubeRay's CRD
schemas vendored in infra/kuberay/schemas/ (made strict the same way), and every pod template inside them
against core PodTemplateSpec too. Not checked: CRD CEL rules (x-kubernetes-validations; the test below shows
that no manifest sets a field that carries one) and admission webhooks.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.conftest import REPO

INFRA = REPO / "infra"
SCHEMAS = INFRA / "kuberay" / "schemas"
# the Kubernetes API KubeRay 1.6.2 is built against (k8s.io/api v0.35.0 in ray-operator/go.mod at v1.6.2)
K8S = "1.35.0"
CRDS = {"RayCluster": "raycluster-v1.json", "RayJob": "rayjob-v1.json"}
OBJECT_META, POD_TEMPLATE = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "io.k8s.api.core.v1.PodTemplateSpec"
NOT_SCHEMAS = {"default", "enum", "example", "x-kubernetes-list-map-keys", "required"}  # values, not subschemas


def documents() -> list[tuple[str, dict]]:
    """(file:kind/name, object) for every document of infra/kuberay/*.yaml and infra/mlflow/*.yaml."""
    out = []
    for path in sorted([*INFRA.glob("kuberay/*.yaml"), *INFRA.glob("mlflow/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                meta = doc["metadata"]
                out.append((f"{path.name}:{doc['kind']}/{meta.get('name') or meta['generateName']}", doc))
    return out


def strict(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false on every object that lists its properties.

    The API server prunes unknown fields of a CRD object silently, and `kubectl apply` (strict field validation,
    its default since Kubernetes 1.27) rejects them; KubeRay's CRDs say neither, so a misspelt field would pass.
    Objects with x-kubernetes-preserve-unknown-fields or their own additionalProperties are left alone.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in NOT_SCHEMAS else
           {name: strict(s) for name, s in value.items()} if key == "properties" else strict(value)
           for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def list_type(validator: Any, kind: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: the API server rejects repeated items of a set and repeated keys of a map."""
    if not validator.is_type(instance, "array"):
        return
    if kind == "set" and len({json.dumps(item, sort_keys=True) for item in instance}) < len(instance):
        yield jsonschema.ValidationError(f"repeated items in a list-type set: {instance}")
    if kind == "map":
        keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in instance]
        for key in {k for k in keys if keys.count(k) > 1}:
            yield jsonschema.ValidationError(f"repeated key {dict(zip(schema['x-kubernetes-list-map-keys'], key, strict=True))}")


CRDValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-type": list_type})


@functools.cache
def crd_validator(kind: str) -> Any:
    return CRDValidator(strict(json.loads((SCHEMAS / CRDS[kind]).read_text())))


@functools.cache
def core_validator(definition: str) -> jsonschema.Draft202012Validator:
    """A strict validator for one type of kubernetes-validate's bundled Kubernetes K8S schemas (ObjectMeta...)."""
    base = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S}-local-strict"
    defs = Resource.from_contents(json.loads((base / "_definitions.json").read_text()))
    schema = {"$ref": f"{defs.id()}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=defs @ Registry())


def errors(validator: Any, obj: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def pod_templates(kind: str, spec: dict) -> list[tuple[str, dict]]:
    """(path, PodTemplateSpec) of every pod KubeRay makes from a RayCluster or RayJob spec."""
    if kind == "RayJob":
        found = [("spec.submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        return found + [(f"spec.rayClusterSpec.{p[5:]}", t) for p, t in pod_templates("RayCluster", spec["rayClusterSpec"])]
    return ([("spec.headGroupSpec.template", spec["headGroupSpec"]["template"])]
            + [(f"spec.workerGroupSpecs[{g['groupName']}].template", g["template"]) for g in spec["workerGroupSpecs"]])


def validate(doc: dict) -> list[str]:
    """Every schema error a cluster would report for doc ([] when it would accept it)."""
    if doc["kind"] not in CRDS:
        try:
            kubernetes_validate.validate(doc, K8S, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
        return []
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    found = errors(crd_validator(doc["kind"]), doc)
    found += [f"metadata: {e}" for e in errors(core_validator(OBJECT_META), doc["metadata"])]
    for path, template in pod_templates(doc["kind"], doc["spec"]):
        found += [f"{path} (PodTemplateSpec): {e}" for e in errors(core_validator(POD_TEMPLATE), template)]
    return found


DOCS = documents()


def test_every_manifest_file_is_validated() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "NetworkPolicy",
            "ConfigMap"} <= kinds
    assert {name.split(":")[0] for name, _ in DOCS} == {"raycluster.yaml", "rayjob.yaml", "storage.yaml",
                                                        "networkpolicy.yaml", "mlflow.yaml"}


@pytest.mark.parametrize("name,doc", DOCS, ids=[name for name, _ in DOCS])
def test_manifest_matches_its_schema(name: str, doc: dict) -> None:
    assert validate(doc) == [], name


def misspelt(name: str, edit: Any) -> dict:
    """A deep copy of the named manifest with edit applied."""
    doc = copy.deepcopy(dict(DOCS)[name])
    edit(doc)
    return doc


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize("name,edit,expect", [
    # a misspelt field in the CRD's own part, in a pod template (caught twice: CRD and PodTemplateSpec) and in a core kind
    ("raycluster.yaml:RayCluster/hftlab", lambda d: rename(d["spec"]["workerGroupSpecs"][0], "replicas", "replica"),
     r"workerGroupSpecs\.0: .*'replica' was unexpected"),
    ("rayjob.yaml:RayJob/hftlab-quickstart-",
     lambda d: rename(d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], "containers", "container"),
     r"headGroupSpec\.template \(PodTemplateSpec\): spec: .*'container' was unexpected"),
    ("mlflow.yaml:Deployment/mlflow", lambda d: rename(d["spec"], "replicas", "replica"), r"'replica' was unexpected"),
    # wrong types: KubeRay wants strings in rayStartParams, Kubernetes an integer port
    ("raycluster.yaml:RayCluster/hftlab", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     r"rayStartParams\.num-cpus: 0 is not of type 'string'"),
    ("mlflow.yaml:Service/mlflow", lambda d: d["spec"]["ports"][0].update(port="5000"), r"ports\.0\.port: '5000' is not of type"),
    # an unknown enum value, a metadata typo and two containers of one name (list-type map, keyed by name)
    ("rayjob.yaml:RayJob/hftlab-quickstart-", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
     r"authOptions\.mode: 'tokens' is not one of \['disabled', 'token'\]"),
    ("rayjob.yaml:RayJob/hftlab-quickstart-", lambda d: rename(d["metadata"], "labels", "label"),
     r"metadata: .*'label' was unexpected"),
    ("raycluster.yaml:RayCluster/hftlab",
     lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"].append(
         d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]), r"repeated key \{'name': 'ray-worker'\}"),
], ids=["crd-field", "pod-template-field", "core-field", "crd-type", "core-type", "crd-enum", "crd-metadata", "list-map"])
def test_a_broken_manifest_fails_naming_the_field(name: str, edit: Any, expect: str) -> None:
    found = validate(misspelt(name, edit))
    assert any(re.search(expect, e) for e in found), found


def cel_rule_paths(schema: dict, path: str = "") -> list[str]:
    """Dotted paths (list items as []) of every field whose schema carries CEL rules."""
    found = [path] if "x-kubernetes-validations" in schema else []
    for name, sub in schema.get("properties", {}).items():
        found += cel_rule_paths(sub, f"{path}.{name}".lstrip("."))
    if "items" in schema:
        found += cel_rule_paths(schema["items"], f"{path}[]")
    return found


def has(obj: Any, path: str) -> bool:
    head, _, rest = path.partition(".")
    key, items = head.removesuffix("[]"), head.endswith("[]")
    if not isinstance(obj, dict) or key not in obj:
        return False
    values = obj[key] if items else [obj[key]]
    return any(has(v, rest) for v in values) if rest else True


def test_no_manifest_sets_a_field_whose_cel_rules_go_unchecked() -> None:
    for kind, file in CRDS.items():
        paths = cel_rule_paths(json.loads((SCHEMAS / file).read_text()))
        assert "spec.managedBy" in paths  # the rules are found where KubeRay puts them
        for name, doc in DOCS:
            if doc["kind"] == kind:
                assert [p for p in paths if has(doc, p)] == [], name


def test_vendored_schemas_are_the_operator_version_the_docs_install() -> None:
    installed = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)",
                          (REPO / "docs" / "cluster.md").read_text()).group(1)
    readme = (SCHEMAS / "README.md").read_text()
    assert f"tag `v{installed}`" in readme and re.search(r"commit `[0-9a-f]{40}`", readme)
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(CRDS.values())
    for file in CRDS.values():
        schema = json.loads((SCHEMAS / file).read_text())
        assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, K8S, strict=True)
    assert Path(str(files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S}-local-strict")).is_dir()
