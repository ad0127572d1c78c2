"""Cohere v2 / TEI pieces that need no server: quantization (against sentence-transformers), request
schemas, TEI's error mapping. The live routes are tested in tests/test_serve.py, on its Serve app."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from bge_ray.serve.limits import ApiError
from bge_ray.serve.quantize import batch_ranges, quantize, unit_ranges
from tests.oracle import require


def _vectors(n: int = 40, dim: int = 64, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0, :4] = [-1.0, 1.0, 0.0, 0.5]  # range ends and a zero
    return x


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_equals_sentence_transformers(precision):
    st = require("sentence_transformers.util.quantization")
    x = _vectors()
    fixed = unit_ranges(x.shape[1])
    got = quantize(x, precision, fixed)
    want = st.quantize_embeddings(x, precision, ranges=fixed)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # No ranges: both calibrate on the batch itself.
    np.testing.assert_array_equal(quantize(x, precision), st.quantize_embeddings(x, precision))
    np.testing.assert_array_equal(batch_ranges(x), np.stack([x.min(0), x.max(0)]))
    # Odd widths pad the last byte; an unnormalized batch with a constant dimension.
    y = np.random.default_rng(1).normal(size=(5, 13)).astype(np.float32) * 3
    y[:, 2] = 0.25
    np.testing.assert_array_equal(quantize(y, precision), st.quantize_embeddings(y, precision))


def test_quantize_fixed_range_is_per_text_and_refuses_what_it_cannot_calibrate():
    x = _vectors()
    ranges = unit_ranges(x.shape[1])
    # A text gets the same code alone as in any batch (the point of a fixed range).
    np.testing.assert_array_equal(quantize(x[3:4], "int8", ranges), quantize(x, "int8", ranges)[3:4])
    with pytest.raises(ValueError, match="at least two"):
        quantize(x[:1], "int8")
    with pytest.raises(ValueError, match="expected \\(2, 64\\)"):
        quantize(x, "uint8", unit_ranges(8))
    with pytest.raises(ValueError, match="precision"):
        quantize(x, "int4")
    with pytest.raises(TypeError, match="floats"):
        quantize(quantize(x, "int8", ranges), "int8", ranges)


def test_embeddings_by_type_calibration_choice():
    from bge_ray.serve.cohere_api import embeddings_by_type

    x = _vectors(3)
    out = embeddings_by_type(x, ["float", "int8", "ubinary", "base64"], normalized=True)
    assert list(out) == ["float", "int8", "ubinary", "base64"]
    assert out["int8"] == quantize(x, "int8", unit_ranges(64)).tolist()
    assert len(out["ubinary"][0]) == 8 and all(0 <= b <= 255 for b in out["ubinary"][0])
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(out["base64"][1]), "<f4"), x[1])
    # Normalized: one vector alone is quantized (fixed range), as it would be in a batch.
    assert embeddings_by_type(x[1:2], ["int8"], normalized=True)["int8"] == out["int8"][1:2]


def test_embeddings_by_type_refuses_one_unnormalized_vector():
    from bge_ray.serve.cohere_api import embeddings_by_type

    x = _vectors(3) * 5
    with pytest.raises(ApiError, match="at least two"):
        embeddings_by_type(x[:1], ["uint8"], normalized=False)
    assert embeddings_by_type(x, ["uint8"], normalized=False)["uint8"] == quantize(x, "uint8").tolist()
    assert embeddings_by_type(x[:1], ["binary"], normalized=False)["binary"] == quantize(x[:1], "binary").tolist()


def test_cohere_v2_schemas():
    from bge_ray.serve.schemas_cohere import EmbedRequestV2, RerankRequestV2

    req = EmbedRequestV2.model_validate(
        {"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "input_type": "search_query", "embedding_types": ["int8", "float", "int8"]}
    )
    assert req.text_list == ["a\nb"] and req.is_query and req.types == ["int8", "float"] and req.truncate == "END"
    assert not EmbedRequestV2.model_validate({"texts": ["x"], "input_type": "clustering"}).is_query
    for body, needle in [
        ({"texts": ["x"], "inputs": [{"content": [{"type": "text", "text": "x"}]}]}, "exactly one"),
        ({}, "exactly one"),
        ({"texts": []}, "empty list"),
        ({"texts": ["x"], "input_type": "image"}, "image inputs"),
        ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types[0]"),
        ({"texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
        ({"texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "images are not supported"),
        ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "inputs[0].content[0]"),
    ]:
        with pytest.raises(ValidationError, match=r"(?s).*" + needle.replace("[", r"\[").replace("]", r"\]")):
            EmbedRequestV2.model_validate(body)
    rr = RerankRequestV2.model_validate({"query": "q", "documents": ["a", "b"]})
    assert rr.max_tokens_per_doc == 4096 and rr.top_n is None
    with pytest.raises(ValidationError, match="documents\\[1\\]"):
        RerankRequestV2.model_validate({"query": "q", "documents": ["a", {"text": "b"}]})


def test_tei_schemas_and_error_mapping():
    from bge_ray.serve.schemas_tei import EmbedRequestTEI, RerankRequestTEI
    from bge_ray.serve.tei_api import error

    req = EmbedRequestTEI.model_validate({"inputs": "x", "truncation_direction": "left", "prompt_name": "query"})
    assert req.texts == ["x"] and req.truncation == "START" and req.is_query and req.normalize
    assert EmbedRequestTEI.model_validate({"inputs": ["x"], "truncate": False}).truncation == "NONE"
    assert EmbedRequestTEI.model_validate({"inputs": ["x"], "truncate": None}).truncation == "END"
    with pytest.raises(ValidationError, match="token ids"):
        EmbedRequestTEI.model_validate({"inputs": [[101, 102]]})
    with pytest.raises(ValidationError, match="prompt_name"):
        EmbedRequestTEI.model_validate({"inputs": "x", "prompt_name": "classification"})
    assert not RerankRequestTEI.model_validate({"query": "q", "texts": ["a"]}).raw_scores

    def mapped(exc):
        r = error(exc)
        return r.status_code, json.loads(r.body)

    assert mapped(ApiError(400, "`inputs` cannot be empty", code="empty_input")) == (
        400, {"error": "`inputs` cannot be empty", "error_type": "Empty"})
    assert mapped(ApiError(400, "bad", code="invalid_value")) == (
        422, {"error": "Input validation error: bad", "error_type": "Validation"})
    assert mapped(ApiError(404, "no reranker", param="model", code="model_not_found"))[1]["error_type"] == "Backend"
    assert mapped(ApiError(404, "no reranker", param="model", code="model_not_found"))[0] == 424
    assert mapped(ApiError(401, "missing bearer token", code="missing_api_key")) == (
        401, {"error": "missing bearer token", "error_type": "Validation"})
    assert mapped(ApiError(413, "too big", code="body_too_large"))[0] == 413
    assert mapped(ApiError(500, "internal", code="internal_error")) == (500, {"error": "internal", "error_type": "Backend"})
