"""Regenerate rayjob.ray.io_v1.json.gz from KubeRay's RayJob CRD (see SOURCE.md).

    python cluster/k8s/schema/regenerate.py path/to/ray.io_rayjobs.yaml

Takes the `v1` version's `schema.openAPIV3Schema` out of the CustomResourceDefinition, unchanged, and
writes it as gzipped JSON with sorted keys (a byte-stable file: regenerating from the same CRD changes
nothing). tests/k8s_schema.py validates cluster/k8s/rayjob.yaml against it.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("rayjob.ray.io_v1.json.gz")


def v1_schema(crd: dict) -> dict:
    """The openAPIV3Schema of the CRD's `v1` version; a clear error if the file is not the RayJob CRD."""
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayJob":
        raise SystemExit("regenerate: expected KubeRay's RayJob CustomResourceDefinition (ray.io_rayjobs.yaml)")
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1":
            return version["schema"]["openAPIV3Schema"]
    raise SystemExit("regenerate: the CRD has no v1 version")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python cluster/k8s/schema/regenerate.py path/to/ray.io_rayjobs.yaml")
    crd = yaml.safe_load(Path(argv[0]).read_text())
    text = json.dumps(v1_schema(crd), sort_keys=True, separators=(",", ":"))
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(text.encode())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
