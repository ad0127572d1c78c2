"""Extract the v1 openAPIV3Schema of KubeRay CRDs into the JSON files validate.py checks against.

    python cluster/schemas/extract_kuberay_schemas.py KUBERAY/ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml

The committed files come from KubeRay v1.7.0 (ray-operator/config/crd/bases). Descriptions and the
`status` subtree are dropped to keep them small; every type, enum, pattern, `required` list and
`x-kubernetes-*` marker is kept as the CRD has it.
"""

from __future__ import annotations

import json
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            crd = yaml.safe_load(f)
        kind = crd["spec"]["names"]["kind"]
        group = crd["spec"]["group"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        out = os.path.join(HERE, f"{group}_v1_{kind.lower()}.json")
        with open(out, "w") as f:
            json.dump(schema, f, separators=(",", ":"), sort_keys=True)
            f.write("\n")
        print(f"{path} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
