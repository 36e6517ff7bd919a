"""cluster/k8s/rayjob.yaml against KubeRay's own RayJob v1 schema (tests/k8s_schema.py): no Kubernetes runs here,
so this is the check `kubectl apply --validate=strict` would make. Each broken copy must be refused with the
path of what is wrong, which shows the validator is strict, not merely permissive."""

import copy
from pathlib import Path

import pytest
import yaml

from tests.k8s_schema import validate_rayjob

MANIFEST = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "k8s" / "rayjob.yaml").read_text())
WORKERS = "spec.rayClusterSpec.workerGroupSpecs[0]"


def test_the_project_rayjob_manifest_is_valid_against_the_kuberay_crd():
    assert validate_rayjob(MANIFEST) == []


def broken(edit):
    manifest = copy.deepcopy(MANIFEST)
    edit(manifest)
    return validate_rayjob(manifest)


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize("edit, where, what", [
    (lambda m: rename(m["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
     "spec", "'shutdownAfterJobFinish' was unexpected"),
    (lambda m: m["spec"].update(ttlSecondsAfterFinished="600"),
     "spec.ttlSecondsAfterFinished", "is not of type 'integer'"),
    (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"),
     f"{WORKERS}.replicas", "is not of type 'integer'"),
    (lambda m: rename(m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
                      "image", "imagee"),
     f"{WORKERS}.template.spec.containers[0]", "'imagee' was unexpected"),
    (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"),
     f"{WORKERS}.template.spec.containers[0]", "'name' is a required property"),
    (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].update(cpu=[2]),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].resources.limits.cpu", "is not valid"),
    (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", "is not of type 'string'"),
    (lambda m: m["spec"].pop("rayClusterSpec") and m["spec"].update(rayClusterSpec={"headGroupSpec": {}}),
     "spec.rayClusterSpec.headGroupSpec", "'template' is a required property"),
    (lambda m: m.update(apiVersion="ray.io/v1alpha1"), "apiVersion/kind", "expected ray.io/v1 RayJob"),
    (lambda m: m["metadata"].update(name="DSR_mnist"), "metadata.name", "RFC 1123"),
])
def test_a_broken_manifest_is_refused_with_the_path_of_what_is_wrong(edit, where, what):
    errors = broken(edit)
    assert any(e.startswith(f"{where}: ") and what in e for e in errors), errors


def test_int_or_string_quantities_take_both_forms():
    """Kubernetes quantities (`cpu: 2` or `cpu: "500m"`) are x-kubernetes-int-or-string in the CRD."""
    def quantities(m):
        m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"] \
            .update(cpu=2, memory="8Gi")
        m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] \
            ["limits"].update(cpu="500m")
    assert broken(quantities) == []
