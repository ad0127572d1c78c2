"""Validate the cluster configs offline: `python cluster/validate.py [FILE ...]` (default: all of cluster/).

- KubeRay manifests (RayCluster / RayJob / RayService, apiVersion ray.io/v1): JSON-schema check
  against the openAPIV3Schema of KubeRay v1.7.0's CRDs (cluster/schemas/, see
  extract_kuberay_schemas.py), strict like `kubectl --validate=strict`: an unknown field is an error.
  Then the operator's own checks that matter here (KubeRay's validation.go: names, containers,
  replica bounds, RayJob cluster source, deadlines). CEL rules (`x-kubernetes-validations`) are not
  evaluated; no manifest here sets the fields that carry them (managedBy, deletionStrategy).
- Embedded configs: a RayJob's runtimeEnvYAML and every Serve application's runtime_env parse with
  Ray's RuntimeEnv; a RayService's serveConfigV2 with Ray's ServeDeploySchema, its import path
  must resolve to a module of this repository and bge_ray's args validate with its AppSettings.
- Every `python jobs/X.py ...` command names an existing job whose argument parser accepts it
  (parsed, never run).
- A PersistentVolumeClaim's spec: against the PVC spec schema embedded in the same CRDs.
- `ray up` configs: Ray's own `prepare_config` + `validate_config` (ray/autoscaler/ray-schema.json),
  what `ray up` runs before it contacts the cloud; local file_mounts must exist.
- Nothing listens off loopback without auth: a cluster's dashboard / Jobs API (KubeRay binds it to
  0.0.0.0 unless dashboard-host says otherwise) needs `authOptions.mode: token`; a bge_ray Serve app
  on a non-loopback host needs its bearer token (`api_key_env`) in the app's runtime_env or in every
  group's containers from a Secret that is not `optional`; a RayCluster container declaring the
  Serve port needs the same.
- cluster/runtime_env.yaml: Ray's RuntimeEnv, and its pip list equals pyproject's dependencies.
- cluster/serve_config.yaml (for `serve deploy`): as a RayService's serveConfigV2.
- One Ray version everywhere: rayVersion, the images' tags and the installed Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable
from typing import Any

import yaml

CLUSTER_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(CLUSTER_DIR)
SCHEMA_DIR = os.path.join(CLUSTER_DIR, "schemas")
RAY_KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayService": "rayservice"}
# KubeRay's MaxRayClusterNameLength (53) and MaxRayJob/ServiceNameLength (53 - 6).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


class ConfigError(Exception):
    """Raised by `check` with every problem found, one per line."""


# --------------------------------------------------------------------------- schemas


def _strict(node: Any) -> Any:
    """Reject unknown fields: every object schema that lists properties and neither sets
    additionalProperties nor preserves unknown fields gets additionalProperties: false."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_schema(kind: str) -> dict:
    path = os.path.join(SCHEMA_DIR, f"ray.io_v1_{RAY_KINDS[kind]}.json")
    with open(path) as f:
        schema = _strict(json.load(f))
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.cache
def pvc_schema() -> dict:
    """PersistentVolumeClaimSpec, as the CRDs embed it in pod volumes (ephemeral.volumeClaimTemplate)."""
    spec = crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]
    volume = spec["properties"]["template"]["properties"]["spec"]["properties"]["volumes"]["items"]
    claim_spec = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "PersistentVolumeClaim"},
            "metadata": OBJECT_META,
            "spec": {**claim_spec, "required": ["accessModes", "resources"]},
        },
    }


def _path(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def schema_errors(doc: Any, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for e in errors:
        msg = e.message
        if e.validator == "additionalProperties" and e.validator_value is False:
            msg = msg.replace("Additional properties are not allowed", "unknown field")
        elif e.validator == "required":
            msg = f"missing required field {msg.split(' is a required property')[0]}"
        out.append(f"{_path(e.absolute_path)}: {msg}")
    return out


# --------------------------------------------------------------------------- embedded configs


def runtime_env_errors(env: Any, where: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if env is None:
        return []
    if not isinstance(env, dict):
        return [f"{where}: a runtime env must be a mapping, got {type(env).__name__}"]
    unknown = sorted(set(env) - RuntimeEnv.known_fields)
    if unknown:
        return [f"{where}: unknown runtime env field(s) {unknown}; Ray knows {sorted(RuntimeEnv.known_fields)}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        return [f"{where}: {e}"]
    return []


def _parse_yaml_string(text: Any, where: str) -> tuple[Any, list[str]]:
    if not isinstance(text, str):
        return None, [f"{where}: expected a YAML string, got {type(text).__name__}"]
    try:
        return yaml.safe_load(text), []
    except yaml.YAMLError as e:
        return None, [f"{where}: not valid YAML: {e}"]


class _Parsed(Exception):
    pass


@functools.cache
def _job_module(path: str):
    spec = importlib.util.spec_from_file_location(f"_bge_ray_job_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_command_errors(command: str, where: str) -> list[str]:
    """`python jobs/X.py ARGS`: the job exists and its parser accepts ARGS (main() is stopped right
    after its argparse parse, before anything runs)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return [f"{where}: cannot split the command {command!r}: {e}"]
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python"):
        return [f"{where}: expected `python jobs/<job>.py ...`, got {command!r}"]
    m = re.search(r"(?:^|/)(jobs/[A-Za-z0-9_]+\.py)$", argv[1])
    if not m:
        return [f"{where}: {argv[1]!r} is not a script under jobs/"]
    script = os.path.join(REPO, m.group(1))
    if not os.path.isfile(script):
        jobs = sorted(f for f in os.listdir(os.path.join(REPO, "jobs")) if f.endswith(".py"))
        return [f"{where}: {m.group(1)} does not exist (jobs: {', '.join(jobs)})"]
    args = argv[2:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    stderr = io.StringIO()
    try:
        module = _job_module(script)
        argparse.ArgumentParser.parse_args = parse_then_stop
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.main(args)
    except _Parsed as parsed:
        return _job_semantics(m.group(1), vars(parsed.args[0]), where)
    except SystemExit:
        found = re.findall(r"error: (.*)", stderr.getvalue())
        return [f"{where}: {m.group(1)} rejects its arguments: {found[-1] if found else stderr.getvalue().strip()}"]
    finally:
        argparse.ArgumentParser.parse_args = original
    return [f"{where}: {m.group(1)}'s main() returned without parsing arguments"]


def _job_semantics(job: str, ns: dict, where: str) -> list[str]:
    """Rules the jobs enforce only once running, checked here so a cluster run does not fail late."""
    if job == "jobs/embed_corpus.py" and "://" in str(ns.get("output")):
        return [f"{where}: embed_corpus --output must be a shared filesystem path, not {ns['output']!r}"]
    return []


def serve_config_errors(config: Any, where: str) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{where}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())]
    errors = []
    for i, app in enumerate(schema.applications):
        at = f"{where}.applications[{i}]"
        errors += runtime_env_errors(config["applications"][i].get("runtime_env"), f"{at}.runtime_env")
        sep = ":" if ":" in app.import_path else "."
        module, _, attr = app.import_path.rpartition(sep)
        if not module.startswith("bge_ray"):
            continue
        rel = module.replace(".", "/")
        if not (os.path.isfile(os.path.join(REPO, rel + ".py")) or os.path.isdir(os.path.join(REPO, rel))):
            errors.append(f"{at}.import_path: module {module} not found in this repository ({rel}.py)")
            continue
        if not re.search(rf"^(def|class) {re.escape(attr)}\b|^{re.escape(attr)}\s*=", _read(rel + ".py"), re.M):
            errors.append(f"{at}.import_path: {module} defines no {attr}")
        if module.startswith("bge_ray.serve"):
            from bge_ray.serve.config import AppSettings

            try:
                settings = AppSettings.from_args(app.args)
            except ValidationError as e:
                errors.append(f"{at}.args: " + "; ".join(
                    f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
                continue
            except ValueError as e:
                errors.append(f"{at}.args: {e}")
                continue
            # Overrides under `deployments:` must name deployments the app creates.
            names = {"Ingress", *(s.deployment_name("embedder") for s in settings.embedders),
                     *(s.deployment_name("reranker") for s in settings.rerankers)}
            for j, d in enumerate(app.deployments):
                if d.name not in names:
                    errors.append(f"{at}.deployments[{j}].name: {d.name!r} is not a deployment of this app "
                                  f"(it has {sorted(names)})")
    return errors


def _read(rel: str) -> str:
    path = os.path.join(REPO, rel)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f.read()


# --------------------------------------------------------------------------- KubeRay


def _cluster_spec_errors(spec: dict, at: str) -> list[str]:
    """The subset of KubeRay's ValidateRayClusterSpec that applies to these manifests."""
    errors = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    head = spec.get("headGroupSpec", {})
    if not head.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{at}.headGroupSpec: headGroupSpec should have at least one container")
    groups = spec.get("workerGroupSpecs", [])
    names = [g.get("groupName") for g in groups]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"{at}.workerGroupSpecs: duplicate groupName {dup!r}")
    for i, g in enumerate([head, *groups]):
        gat = f"{at}.headGroupSpec" if i == 0 else f"{at}.workerGroupSpecs[{i - 1}]"
        params = g.get("rayStartParams", {}) or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{gat}: resource fields set in both rayStartParams and resources; use only one")
        if "labels" in params:
            errors.append(f"{gat}: rayStartParams['labels'] is not supported; use the group's labels field")
        if i == 0:
            continue
        if not g.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{gat}: workerGroupSpec should have at least one container")
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{gat}: minReplicas and maxReplicas must both be set when autoscaling is disabled")
        for key, v in (("minReplicas", lo), ("maxReplicas", hi)):
            if isinstance(v, int) and v < 0:
                errors.append(f"{gat}.{key}: negative ({v})")
        if isinstance(lo, int) and isinstance(hi, int):
            if lo > hi:
                errors.append(f"{gat}: minReplicas {lo} greater than maxReplicas {hi}")
            elif isinstance(n, int) and not lo <= n <= hi:
                errors.append(f"{gat}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
    return errors


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVE_PORT = 8000


def dashboard_auth_errors(spec: dict, at: str) -> list[str]:
    """The dashboard's Jobs API runs whatever it is sent: off loopback it needs Ray's token auth."""
    params = spec.get("headGroupSpec", {}).get("rayStartParams") or {}
    host = str(params.get("dashboard-host", "0.0.0.0"))  # KubeRay's default for the head
    if host in LOOPBACK or (spec.get("authOptions") or {}).get("mode") == "token":
        return []
    return [f"{at}: the dashboard and Jobs API listen on {host} without auth (anyone who reaches port 8265 can "
            f"run code on the cluster): set {at}.authOptions.mode: token, or dashboard-host: 127.0.0.1"]


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    return [(f"{name}.template.spec.containers[{j}]", c) for name, g in groups
            for j, c in enumerate(g.get("template", {}).get("spec", {}).get("containers", []))]


def _secret_env_errors(container: dict, env_name: str, at: str) -> list[str]:
    """``env_name`` set in ``container``, from a Secret that must exist (a plain value is a key in the manifest)."""
    entry = next((e for e in container.get("env", []) if e.get("name") == env_name), None)
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    if entry is None:
        return [f"{at}.env: no {env_name}: the Serve app's bearer token, from a Secret"]
    if ref is None:
        return [f"{at}.env.{env_name}: set it from a Secret (valueFrom.secretKeyRef), not a value in the manifest"]
    if ref.get("optional"):
        return [f"{at}.env.{env_name}: the Secret is optional: without it the pod starts and serves with no auth; "
                "drop `optional: true`"]
    return []


def serve_auth_errors(config: dict, cluster: dict, at: str) -> list[str]:
    """A bge_ray app served off loopback must get its bearer token on every node an ingress can run on."""
    from bge_ray.serve.config import AppSettings

    host = str((config.get("http_options") or {}).get("host", "127.0.0.1"))  # Serve's default
    if host in LOOPBACK:
        return []
    errors = []
    for app in config.get("applications") or []:
        if not str(app.get("import_path", "")).startswith("bge_ray.serve"):
            continue
        try:
            env_name = AppSettings.from_args(app.get("args")).api_key_env
        except ValueError:
            continue  # reported by serve_config_errors
        if ((app.get("runtime_env") or {}).get("env_vars") or {}).get(env_name):
            continue
        for where, container in _containers(cluster):
            errors += [f"{at} (Serve on {host}, app {app.get('name')!r}): {e}"
                       for e in _secret_env_errors(container, env_name, f"spec.rayClusterConfig.{where}")]
    return errors


def serve_port_errors(spec: dict, at: str) -> list[str]:
    """A RayCluster that declares the Serve port is meant to serve: its containers carry the token."""
    from bge_ray.serve.config import AppSettings

    env_name = AppSettings().api_key_env
    errors = []
    for where, container in _containers(spec):
        if any(p.get("containerPort") == SERVE_PORT or p.get("name") == "serve" for p in container.get("ports", [])):
            errors += _secret_env_errors(container, env_name, f"{at}.{where}")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    kind = doc["kind"]
    spec = doc.get("spec", {})
    name = doc.get("metadata", {}).get("name", "")
    errors = []
    if len(name) > MAX_NAME[kind]:
        errors.append(f"metadata.name: {kind} name should be no more than {MAX_NAME[kind]} characters")
    if not DNS1035.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (lower case, digits, '-'; starts with a letter)")
    if kind == "RayCluster":
        errors += _cluster_spec_errors(spec, "spec")
        errors += dashboard_auth_errors(spec, "spec")
        errors += serve_port_errors(spec, "spec")
    elif kind == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("clusterSelector") and not spec["clusterSelector"].get("ray.io/cluster"):
            errors.append("spec.clusterSelector: needs the cluster name under 'ray.io/cluster'")
        if spec.get("clusterSelector") and spec.get("shutdownAfterJobFinishes"):
            errors.append("spec: shutdownAfterJobFinishes would delete a cluster the job did not create (clusterSelector)")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                errors.append(f"spec.{key}: must be a positive integer")
        if spec.get("rayClusterSpec"):
            errors += _cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
            errors += dashboard_auth_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("submissionMode") != "InteractiveMode":
            if not spec.get("entrypoint"):
                errors.append("spec.entrypoint: required unless submissionMode is InteractiveMode")
            else:
                errors += job_command_errors(spec["entrypoint"], "spec.entrypoint")
        if "runtimeEnvYAML" in spec:
            env, errs = _parse_yaml_string(spec["runtimeEnvYAML"], "spec.runtimeEnvYAML")
            errors += errs or runtime_env_errors(env, "spec.runtimeEnvYAML")
            wd = (env or {}).get("working_dir") if isinstance(env, dict) else None
            if isinstance(wd, str) and "://" not in wd:
                errors.append(f"spec.runtimeEnvYAML.working_dir: {wd!r} is a local path; on Kubernetes it must be a "
                              "remote URI (s3://, gs://, https://...zip)")
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig", {})
        errors += _cluster_spec_errors(cluster, "spec.rayClusterConfig")
        errors += dashboard_auth_errors(cluster, "spec.rayClusterConfig")
        if "serveConfigV2" not in spec:
            errors.append("spec.serveConfigV2: missing: the Serve applications to run")
        else:
            config, errs = _parse_yaml_string(spec["serveConfigV2"], "spec.serveConfigV2")
            errors += errs or serve_config_errors(config, "spec.serveConfigV2")
            if not errs and isinstance(config, dict):
                errors += serve_auth_errors(config, cluster, "spec.serveConfigV2")
    return errors


def manifest_errors(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return [f"(document): expected a Kubernetes object, got {type(doc).__name__}"]
    kind = doc.get("kind")
    if kind in RAY_KINDS:
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"apiVersion: {kind} must be ray.io/v1, got {doc.get('apiVersion')!r}"]
        errors = schema_errors(doc, crd_schema(kind))
        return errors or kuberay_errors(doc)
    if kind == "PersistentVolumeClaim":
        return schema_errors(doc, pvc_schema())
    return [f"kind: {kind!r} is not checked here (known: {', '.join([*RAY_KINDS, 'PersistentVolumeClaim'])})"]


# --------------------------------------------------------------------------- ray up, runtime env


def ray_up_errors(config: Any) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        return [f"(document): a `ray up` config must be a mapping, got {type(config).__name__}"]
    import jsonschema

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message} (Ray's ray-schema.json)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"(document): rejected by Ray's prepare_config: {e}"]
    errors = []
    for remote, local in (config.get("file_mounts") or {}).items():
        local_path = os.path.expanduser(local) if local.startswith("~") else os.path.join(REPO, local)
        if not local.startswith("~") and not os.path.exists(local_path):
            errors.append(f"file_mounts[{remote!r}]: local path {local!r} does not exist (relative to the repo root)")
    mounted = {r.rstrip("/"): loc for r, loc in (config.get("file_mounts") or {}).items()}
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for i, cmd in enumerate(config.get(key) or []):
            for ref in re.findall(r"(~/[\w.-]+)/([\w./-]+\.(?:sh|py))", cmd):
                if ref[0] in mounted and not os.path.isfile(os.path.join(REPO, mounted[ref[0]], ref[1])):
                    errors.append(f"{key}[{i}]: {ref[0]}/{ref[1]} is not in the mounted checkout")
    return errors


def pyproject_dependencies() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _norm_req(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def runtime_env_file_errors(env: Any) -> list[str]:
    errors = runtime_env_errors(env, "(document)")
    if errors:
        return errors
    wd = env.get("working_dir")
    if wd is not None and "://" not in wd and not os.path.isdir(os.path.join(REPO, wd)):
        errors.append(f"working_dir: {wd!r} is not a folder relative to the repo root")
    pip = env.get("pip")
    pkgs = pip.get("packages") if isinstance(pip, dict) else pip
    if pkgs is not None:
        want = sorted(map(_norm_req, pyproject_dependencies()))
        got = sorted(map(_norm_req, pkgs))
        if got != want:
            errors.append(f"pip: differs from pyproject.toml's dependencies: missing {sorted(set(want) - set(got))}, "
                          f"extra {sorted(set(got) - set(want))}")
    return errors


# --------------------------------------------------------------------------- files


def ray_versions() -> dict[str, str]:
    """Every place a Ray version is named: rayVersion fields, image tags, the Dockerfile's base."""
    found = {}
    for path in config_files():
        rel = os.path.relpath(path, REPO)
        text = _read(rel)
        for m in re.finditer(r'rayVersion:\s*"?([0-9][0-9.]*)', text):
            found[f"{rel}: rayVersion"] = m.group(1)
        for m in re.finditer(r"rayproject/ray[-a-z]*:([0-9][0-9.]*[0-9])", text):
            found[f"{rel}: {m.group(0)}"] = m.group(1)
    return found


def config_files() -> list[str]:
    out = []
    for root, dirs, files in os.walk(CLUSTER_DIR):
        dirs[:] = sorted(d for d in dirs if d not in ("schemas", "__pycache__"))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith((".yaml", ".yml")) or f == "Dockerfile"]
    return out


def dockerfile_errors(path: str) -> list[str]:
    """COPY sources exist in the build context (the repo root) and RUN names scripts that were copied."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    errors = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if words[:1] == ["COPY"]:
            sources = [w for w in words[1:-1] if not w.startswith("--")]
            errors += [f"line {n}: COPY source {src!r} is not in the build context (repo root)"
                       for src in sources if not os.path.exists(os.path.join(REPO, src))]
        elif words[:1] == ["RUN"]:
            errors += [f"line {n}: RUN uses {sh}, which is not in the repository"
                       for sh in re.findall(r"\b(cluster/[\w./-]+\.sh)\b", line) if not os.path.isfile(os.path.join(REPO, sh))]
    return errors


def file_errors(path: str) -> list[str]:
    """Every problem in one config file, each prefixed with the file and the object it is in."""
    rel = os.path.relpath(path, REPO)
    rel = path if rel.startswith("..") else rel
    if os.path.basename(path) == "Dockerfile":
        return [f"{rel}: {e}" for e in dockerfile_errors(path)]
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            return [f"{rel}: not valid YAML: {e}"]
    out = []
    for i, doc in enumerate(docs):
        if os.path.basename(path) == "runtime_env.yaml":
            errs, label = runtime_env_file_errors(doc), "runtime env"
        elif isinstance(doc, dict) and "kind" in doc:
            errs = manifest_errors(doc)
            label = f"{doc.get('kind')} {doc.get('metadata', {}).get('name', '?') if isinstance(doc.get('metadata'), dict) else '?'}"
        elif isinstance(doc, dict) and "applications" in doc:
            errs, label = serve_config_errors(doc, "(serve config)"), "Serve config"
        elif isinstance(doc, dict) and "provider" in doc:
            errs, label = ray_up_errors(doc), f"ray up cluster {doc.get('cluster_name', '?')}"
        else:
            errs = ["not a Kubernetes object (no kind), a `ray up` config (no provider), a Serve config "
                    "(no applications) nor runtime_env.yaml"]
            label = "?"
        where = f"{rel} (document {i + 1}, {label})" if len(docs) > 1 else f"{rel} ({label})"
        out += [f"{where}: {e}" for e in errs]
    return out


def check(paths: Iterable[str] | None = None) -> None:
    """Raise ConfigError listing every problem in the given files (default: all of cluster/)."""
    paths = list(paths) if paths is not None else config_files()
    errors = [e for p in paths for e in file_errors(p)]
    import ray

    versions = ray_versions()
    if len(set(versions.values()) | {ray.__version__}) > 1:
        listed = "; ".join(f"{k} = {v}" for k, v in sorted(versions.items()))
        errors.append(f"Ray versions differ (installed: {ray.__version__}): {listed}")
    if errors:
        raise ConfigError("\n".join(errors))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="default: every YAML under cluster/")
    a = p.parse_args(argv)
    files = [os.path.abspath(f) for f in a.files] or config_files()
    try:
        check(files)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for f in files:
        print(f"ok  {os.path.relpath(f, REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
