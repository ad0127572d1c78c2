"""cluster/: every config validates offline (cluster/validate.py), and broken ones are rejected
with a message that names the file, the object, the field and what was expected.

No Ray cluster and no Kubernetes: KubeRay manifests against the CRD schemas vendored in
cluster/schemas (KubeRay v1.7.0), `ray up` configs with Ray's own prepare/validate_config,
Serve configs with Ray's ServeDeploySchema and bge_ray's AppSettings, runtime envs with Ray's
RuntimeEnv, job entrypoints with the jobs' own argument parsers.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load_validator():
    spec = importlib.util.spec_from_file_location("cluster_validate", CLUSTER / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_validator()
FILES = V.config_files()


def _doc(rel: str, kind: str | None = None) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d]
    if kind:
        docs = [d for d in docs if d.get("kind") == kind]
    return copy.deepcopy(docs[0])


def _errors(doc: dict) -> str:
    return "\n".join(V.manifest_errors(doc))


# --------------------------------------------------------------------------- the committed files


def test_every_expected_file_is_there():
    rel = {str(Path(p).relative_to(CLUSTER)) for p in FILES}
    for want in (
        "kuberay/raycluster.yaml", "kuberay/rayjob-embed-corpus.yaml", "kuberay/rayservice.yaml",
        "ray-up/aws.yaml", "runtime_env.yaml", "serve_config.yaml", "docker/Dockerfile",
    ):
        assert want in rel
    for kind in ("raycluster", "rayjob", "rayservice"):
        assert (CLUSTER / "schemas" / f"ray.io_v1_{kind}.json").is_file()


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(Path(p).relative_to(CLUSTER)))
def test_config_file_validates(path):
    assert V.file_errors(path) == []


def test_whole_folder_and_ray_versions():
    V.check()  # every file, plus one Ray version across rayVersion, image tags and the installed Ray
    versions = set(V.ray_versions().values())
    import ray

    assert versions == {ray.__version__}


def test_raycluster_shape():
    rc = _doc("kuberay/raycluster.yaml")
    spec = rc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert spec["enableInTreeAutoscaling"] and gpu["minReplicas"] < gpu["maxReplicas"]
    assert spec["authOptions"]["mode"] == "token"


def test_rayjob_runs_embed_corpus_one_actor_per_gpu_worker():
    job = _doc("kuberay/rayjob-embed-corpus.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/embed_corpus.py"]
    (workers,) = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(argv[argv.index("--num-actors") + 1]) == workers["replicas"] * gpus
    assert job["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"].startswith("s3://")
    # The same pip list as cluster/runtime_env.yaml (which test_config_file_validates ties to pyproject).
    assert env["pip"] == yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["pip"]


def test_rayservice_serves_bge_ray_app_and_matches_serve_config():
    svc = _doc("kuberay/rayservice.yaml")["spec"]
    config = yaml.safe_load(svc["serveConfigV2"])
    assert config == yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "bge_ray.serve.app:build_app"
    from bge_ray.serve.app import build_app
    from bge_ray.serve.config import AppSettings

    settings = AppSettings.from_args(app["args"])
    assert all(s.num_gpus >= 1 and s.autoscaling_config for s in [*settings.embedders, *settings.rerankers])
    build_app(app["args"])  # binds the deployments (starts nothing)


def test_runtime_env_matches_pyproject_and_ray_accepts_it():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert {".venv/", "outputs/", ".git/"} <= set(env["excludes"])
    assert sorted(map(V._norm_req, env["pip"]["packages"])) == sorted(map(V._norm_req, V.pyproject_dependencies()))


def test_ray_up_config_passes_rays_own_preparation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up/aws.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["max_workers"] <= prepared["max_workers"] for t in workers)
    assert any("install_bge_ray.sh" in c for c in prepared["setup_commands"])
    assert config["file_mounts"]["~/bge_ray"] == "."


# --------------------------------------------------------------------------- broken manifests


def test_missing_head_group_is_rejected():
    rc = _doc("kuberay/raycluster.yaml")
    del rc["spec"]["headGroupSpec"]
    assert "spec: missing required field 'headGroupSpec'" in _errors(rc)


def test_wrong_type_is_rejected_with_its_path():
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert "spec.workerGroupSpecs[0].maxReplicas: 'eight' is not of type 'integer'" in _errors(rc)


def test_unknown_field_is_rejected():
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8  # typo
    assert "spec.workerGroupSpecs[0]: unknown field ('maxReplica' was unexpected)" in _errors(rc)


def test_bad_quantity_and_bad_enum_are_rejected():
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4 cores"
    rc["spec"]["headGroupSpec"]["serviceType"] = 3
    rc["spec"]["authOptions"]["mode"] = "password"
    errors = _errors(rc)
    assert "containers[0].resources.limits.cpu: '4 cores' does not match" in errors
    assert "spec.authOptions.mode: 'password' is not one of ['disabled', 'token']" in errors
    assert "spec.headGroupSpec.serviceType: 3 is not of type 'string'" in errors


def test_kuberay_operator_rules():
    rc = _doc("kuberay/raycluster.yaml")
    rc["metadata"]["name"] = "BGE_ray"
    rc["spec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2)
    errors = _errors(rc)
    assert "'BGE_ray' is not a DNS-1035 label" in errors
    assert "spec.workerGroupSpecs[0]: minReplicas 5 greater than maxReplicas 2" in errors
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"] = []
    assert "headGroupSpec should have at least one container" in _errors(rc)


def test_wrong_api_version_and_unknown_kind():
    rc = _doc("kuberay/raycluster.yaml")
    rc["apiVersion"] = "ray.io/v1alpha1"
    assert "RayCluster must be ray.io/v1" in _errors(rc)
    assert "'Deployment' is not checked here" in _errors({"apiVersion": "apps/v1", "kind": "Deployment"})


def test_rayjob_entrypoint_is_checked_against_the_job():
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    job["spec"]["entrypoint"] += " --num-gpus 4"
    assert "jobs/embed_corpus.py rejects its arguments: unrecognized arguments: --num-gpus 4" in _errors(job)
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("embed_corpus", "embed")
    assert "jobs/embed.py does not exist (jobs: " in _errors(job)
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    job["spec"]["entrypoint"] = re.sub(r"--output \S+", "--output s3://b/out", job["spec"]["entrypoint"])
    assert "embed_corpus --output must be a shared filesystem path, not 's3://b/out'" in _errors(job)
    job = _doc("kuberay/rayjob-finetune-embedder.yaml")
    job["spec"]["entrypoint"] += " --num_workers four"
    assert "invalid int value: 'four'" in _errors(job)


def test_rayjob_runtime_env_and_cluster_source():
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    job["spec"]["runtimeEnvYAML"] = "working_dir: .\nenv_vars: {N: 4}\n"
    assert "env_vars'] must be of type Dict[str, str]" in _errors(job)
    job["spec"]["runtimeEnvYAML"] = "working_dir: .\n"
    assert "working_dir: '.' is a local path; on Kubernetes it must be a remote URI" in _errors(job)
    job["spec"]["runtimeEnvYAML"] = "pip: [a\n"
    assert "spec.runtimeEnvYAML: not valid YAML" in _errors(job)
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    del job["spec"]["rayClusterSpec"]
    assert "one of rayClusterSpec or clusterSelector must be set" in _errors(job)
    job = _doc("kuberay/rayjob-finetune-embedder.yaml")
    job["spec"]["shutdownAfterJobFinishes"] = True
    assert "shutdownAfterJobFinishes would delete a cluster the job did not create" in _errors(job)


def test_rayservice_serve_config_is_checked():
    def broken(edit) -> str:
        svc = _doc("kuberay/rayservice.yaml")
        config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        edit(config["applications"][0])
        svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        return _errors(svc)

    assert "import path" in broken(lambda a: a.update(import_path="bge_ray"))
    assert "module bge_ray.serve.nope not found" in broken(lambda a: a.update(import_path="bge_ray.serve.nope:app"))
    assert "bge_ray.serve.app defines no make_app" in broken(lambda a: a.update(import_path="bge_ray.serve.app:make_app"))
    assert "args: embedders.0.max_batch_sise: Extra inputs are not permitted" in broken(
        lambda a: a["args"]["embedders"][0].update(max_batch_sise=8))
    assert "args: rerankers.0.num_gpus: Input should be greater than or equal to 0" in broken(
        lambda a: a["args"]["rerankers"][0].update(num_gpus=-1))
    assert "deployments[0].name: 'Embedder' is not a deployment of this app" in broken(
        lambda a: a.update(deployments=[{"name": "Embedder", "num_replicas": 2}]))
    assert "num_replicas` must be an int or \"auto\"" in broken(
        lambda a: a.update(deployments=[{"name": "embedder-bge-m3", "num_replicas": "many"}]))
    svc = _doc("kuberay/rayservice.yaml")
    svc["spec"]["serveConfigV2"] = "applications: [{name: x}]"
    assert "applications.0.import_path: Field required" in _errors(svc)


def test_ports_exposed_without_auth_are_rejected():
    """Dashboard / Jobs API and Serve off loopback need a token; the shipped manifests pass (above)."""
    svc = _doc("kuberay/rayservice.yaml")
    del svc["spec"]["rayClusterConfig"]["authOptions"]
    assert "spec.rayClusterConfig: the dashboard and Jobs API listen on 0.0.0.0 without auth" in _errors(svc)
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    assert "dashboard" not in _errors(svc)

    def with_head_env(edit) -> str:
        svc = _doc("kuberay/rayservice.yaml")
        head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        (key,) = [e for e in head["env"] if e["name"] == "BGE_RAY_API_KEY"]
        edit(head, key)
        return _errors(svc)

    assert "headGroupSpec.template.spec.containers[0].env.BGE_RAY_API_KEY: the Secret is optional" in with_head_env(
        lambda c, key: key["valueFrom"]["secretKeyRef"].update(optional=True))
    assert "containers[0].env: no BGE_RAY_API_KEY" in with_head_env(lambda c, key: c["env"].remove(key))
    assert "not a value in the manifest" in with_head_env(lambda c, key: (key.pop("valueFrom"), key.update(value="k")))

    def with_serve(edit) -> str:
        svc = _doc("kuberay/rayservice.yaml")
        config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        edit(config)
        svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        for c in V._containers(svc["spec"]["rayClusterConfig"]):
            c[1]["env"] = [e for e in c[1]["env"] if e["name"] != "BGE_RAY_API_KEY"]
        return _errors(svc)

    assert "(Serve on 0.0.0.0, app 'bge_ray')" in with_serve(lambda c: None)
    assert "app 'bge_ray'" in with_serve(lambda c: c["applications"][0]["args"].update(api_key_env="OTHER_KEY"))
    assert with_serve(lambda c: c["http_options"].update(host="127.0.0.1")) == ""
    assert with_serve(lambda c: c["applications"][0].setdefault("runtime_env", {}).setdefault("env_vars", {})
                      .update(BGE_RAY_API_KEY="from-runtime-env")) == ""

    rc = _doc("kuberay/raycluster.yaml")
    del rc["spec"]["authOptions"]
    assert "spec: the dashboard and Jobs API listen on 0.0.0.0 without auth" in _errors(rc)
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append({"containerPort": 8000})
    assert "headGroupSpec.template.spec.containers[0].env: no BGE_RAY_API_KEY" in _errors(rc)
    job = _doc("kuberay/rayjob-embed-corpus.yaml")
    del job["spec"]["rayClusterSpec"]["authOptions"]
    assert "spec.rayClusterSpec: the dashboard and Jobs API listen on 0.0.0.0 without auth" in _errors(job)


def test_pvc_is_checked_against_the_claim_spec_schema():
    pvc = _doc("kuberay/pvc-shared.yaml")
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    del pvc["spec"]["resources"]
    errors = _errors(pvc)
    assert "spec.accessModes: 'ReadWriteMany' is not of type 'array'" in errors
    assert "spec: missing required field 'resources'" in errors


def test_broken_ray_up_config_is_rejected():
    config = yaml.safe_load((CLUSTER / "ray-up/aws.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["max_workers"] = "eight"
    assert "max_workers: 'eight' is not of type 'integer' (Ray's ray-schema.json)" in V.ray_up_errors(bad)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    assert any("'min_worker' was unexpected" in e for e in V.ray_up_errors(bad))
    bad = copy.deepcopy(config)
    bad["file_mounts"] = {"~/bge_ray": "no_such_dir"}
    assert any("local path 'no_such_dir' does not exist" in e for e in V.ray_up_errors(bad))
    bad = copy.deepcopy(config)
    bad["setup_commands"] = ["bash ~/bge_ray/cluster/docker/missing.sh"]
    assert any("~/bge_ray/cluster/docker/missing.sh is not in the mounted checkout" in e for e in V.ray_up_errors(bad))


def test_broken_runtime_env_file_is_rejected():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["pip"]["packages"] = [p for p in env["pip"]["packages"] if not p.startswith("faiss")]
    assert "differs from pyproject.toml's dependencies: missing ['faiss-cpu>=1.8']" in "\n".join(
        V.runtime_env_file_errors(env))
    assert "unknown runtime env field(s) ['pip_packages']" in "\n".join(
        V.runtime_env_file_errors({"pip_packages": ["x"]}))


def test_cli_reports_file_and_object(tmp_path, capsys):
    rc = _doc("kuberay/raycluster.yaml")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(rc))
    assert V.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad} (RayCluster bge-ray): spec.workerGroupSpecs[0]: replicas -1 outside [minReplicas 0, maxReplicas 8]" in err


def test_dockerfile_copies_what_exists_and_install_script_parses(tmp_path):
    import subprocess

    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:2.60.0-py311-gpu\nCOPY bge_ray_src ./bge_ray\nRUN bash cluster/docker/setup.sh\n")
    errors = V.dockerfile_errors(str(bad))
    assert "line 2: COPY source 'bge_ray_src' is not in the build context (repo root)" in errors
    assert "line 3: RUN uses cluster/docker/setup.sh, which is not in the repository" in errors
    script = CLUSTER / "docker" / "install_bge_ray.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "install_bge_ray.sh" in (CLUSTER / "docker" / "Dockerfile").read_text()


# --------------------------------------------------------------------------- README


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    assert "## From laptop to cluster" in text, "README.md has no 'From laptop to cluster' section"
    section = text.split("## From laptop to cluster", 1)[1]
    return re.split(r"\n## ", section, maxsplit=1)[0]


def _commands(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def test_readme_section_names_existing_files_and_valid_job_commands():
    section = _readme_section()
    commands = _commands(section)
    for must in ("ray start --head", "ray job submit", "--runtime-env cluster/runtime_env.yaml", "RAY_AUTH_MODE=token",
                 "ray up cluster/ray-up/aws.yaml", "helm install kuberay-operator", "kubectl apply -f cluster/kuberay/",
                 "serve deploy", "--num_workers", "--use_gpu"):
        assert must in section, must
    for path in sorted(set(re.findall(r"\bcluster/[\w./-]*\w", section))):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    jobs = [c.split(" -- ", 1)[1] if " -- " in c else c for c in commands if "python jobs/" in c]
    assert len(jobs) >= 5
    for command in jobs:
        assert V.job_command_errors(command, "README") == [], command


# --------------------------------------------------------------------------- the laptop path, live


@pytest.mark.slow
@pytest.mark.ray
def test_laptop_submit_with_runtime_env_and_token_auth(tmp_path):
    """README's laptop commands: a token-auth head from the `ray` CLI, then `ray job submit
    --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/embed_corpus.py ...`
    (Ray builds the pip virtualenv over this one: every requirement already met, nothing fetched).
    The head is started and stopped as in test_ray_job_submit.py (never `ray stop`)."""
    import json
    import os
    import secrets
    import shutil
    import subprocess
    import tempfile
    import time

    from tests.test_ray_job_submit import RAY_CLI, _free_port, _ray_env, _stop_head

    temp_dir = os.path.realpath(tempfile.mkdtemp(prefix="bgecl_", dir="/tmp"))
    dash = _free_port()
    env = _ray_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    cmd = [RAY_CLI, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    url = f"http://127.0.0.1:{dash}"
    log = tmp_path / "ray_start.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY_CLI, "job", "list", "--address", url], env=env, capture_output=True).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run([RAY_CLI, "job", "list", "--address", url], env=no_token, capture_output=True, text=True)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

        out = tmp_path / "sample_corpus"
        submit = [RAY_CLI, "job", "submit", "--address", url, "--working-dir", ".",
                  "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "jobs/embed_corpus.py",
                  "--input", "bge_ray/data/sample_corpus.jsonl", "--output", str(out), "--num-actors", "1"]
        r = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=480)
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
        assert "embedded 60 rows" in r.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rows"] == manifest["unique_ids"] == 60
    finally:
        left = _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive after teardown: {left}"
