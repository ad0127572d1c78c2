"""Session fixtures: tiny checkpoints built once, shared data paths, offline hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The loopback S3 server's address and credentials, set before any Ray worker starts so that every
# worker finds them as a cluster's workers find theirs: in the standard AWS variables.
S3_PORT = _free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402

# Under CI=true a skip caused by a failed import fails the run.
pytest_plugins = ["tests.import_guard"]


@pytest.fixture(scope="session")
def shared_data():
    if not tiny_models.SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder {tiny_models.SHARED_DATA} is missing (../shared beside the checkout)")
    return tiny_models.SHARED_DATA


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def unigram_tokenizer(tiny_root):
    out = tiny_root / "unigram_tokenizer"
    tiny_models.build_unigram_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tiny_root):
    return tiny_models.build_bert(tiny_root / "bge-tiny-bert")


@pytest.fixture(scope="session")
def tiny_bert_nodrop(tiny_root):
    """A tiny BERT without dropout: training steps are deterministic."""
    return tiny_models.build_bert(tiny_root / "bge-tiny-bert-nodrop", dropout=0.0)


@pytest.fixture(scope="session")
def tiny_m3(tiny_root, unigram_tokenizer):
    return tiny_models.build_m3(tiny_root / "bge-m3-tiny", unigram_tokenizer)


@pytest.fixture(scope="session")
def tiny_xlmr_reranker(tiny_root, unigram_tokenizer):
    return tiny_models.build_xlmr_reranker(tiny_root / "bge-reranker-tiny", unigram_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root, unigram_tokenizer):
    return tiny_models.build_qwen2(tiny_root / "qwen2-embedder-tiny", unigram_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_lm(tiny_root, unigram_tokenizer):
    return tiny_models.build_qwen2(tiny_root / "qwen2-reranker-tiny", unigram_tokenizer, causal_lm=True)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session, on loopback, stopped at the end."""
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="bgeray_", dir="/tmp")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as bge_ray.batch.runtime.init_ray does
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "bge_ray" / "data" / "sample_corpus.jsonl"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (the port in ``AWS_ENDPOINT_URL``), a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    server.stop()
