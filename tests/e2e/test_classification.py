"""The classification extension against a labels file: the top k of an output as
"<value>:<index>[:<label>]" BYTES, per batch entry, over HTTP and gRPC, in Triton's format
(checked against the real Triton 2.51's answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from model_builders import add_constant, write_config
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def labelled(start_server, test_repo, tmp_path_factory):
    """`labelled`: OUTPUT = INPUT + 0.5 ([batch, 4] FP32), three labels for its four classes."""
    repo = tmp_path_factory.mktemp("classes")
    add_constant(repo / "labelled" / "1" / "model.onnx", 0.5)
    write_config(repo / "labelled", 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
                 'input [ { name: "INPUT", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
                 'output [ { name: "OUTPUT", data_type: TYPE_FP32, dims: [ 4 ], label_filename: "labels.txt" } ]\n')
    (repo / "labelled" / "labels.txt").write_text("cat\ndog\nbird\n")
    # an ensemble of it, with labels of its own
    (repo / "labelled_ensemble" / "1").mkdir(parents=True)
    write_config(repo / "labelled_ensemble", 'platform: "ensemble"\nmax_batch_size: 4\n'
                 'input [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
                 'output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ], label_filename: "names.txt" } ]\n'
                 'ensemble_scheduling { step [ { model_name: "labelled" model_version: -1 '
                 'input_map { key: "INPUT" value: "X" } output_map { key: "OUTPUT" value: "Y" } } ] }\n')
    (repo / "labelled_ensemble" / "names.txt").write_text("a\nb\nc\nd\n")
    return start_server([test_repo, repo])


X = np.array([[1.0, 3.0, 2.0, 3.0], [-1.0, -2.0, 7.25, 0.0]], dtype=np.float32)
TOP2 = [[b"3.500000:1:dog", b"3.500000:3"], [b"7.750000:2:bird", b"0.500000:3"]]


@pytest.mark.parametrize("lib", [httpclient, grpcclient])
def test_top_k_with_labels_over_both_protocols(labelled, lib):
    client = (lib.InferenceServerClient(labelled.http_url) if lib is httpclient
              else lib.InferenceServerClient(labelled.grpc_url))
    inp = lib.InferInput("INPUT", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer("labelled", [inp], outputs=[lib.InferRequestedOutput("OUTPUT", class_count=2)])
    assert result.as_numpy("OUTPUT").tolist() == TOP2
    # k past the class count gives every class, highest first, ties in index order
    result = client.infer("labelled", [inp], outputs=[lib.InferRequestedOutput("OUTPUT", class_count=9)])
    assert result.as_numpy("OUTPUT")[0].tolist() == [b"3.500000:1:dog", b"3.500000:3", b"2.500000:2:bird",
                                                     b"1.500000:0:cat"]
    client.close()


def _post(server, model: str, body: dict) -> tuple[int, dict]:
    status, _, reply = server.request("POST", f"/v2/models/{model}/infer", json.dumps(body).encode())
    return status, json.loads(reply)


def _labelled_body(params: dict) -> dict:
    return {"inputs": [{"name": "INPUT", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}],
            "outputs": [{"name": "OUTPUT", "parameters": params}]}


def test_json_answer_and_k_zero(labelled):
    status, body = _post(labelled, "labelled", _labelled_body({"classification": 1}))
    assert status == 200 and body["outputs"] == [{"name": "OUTPUT", "datatype": "BYTES", "shape": [2, 1],
                                                  "data": ["3.500000:1:dog", "7.750000:2:bird"]}]
    status, body = _post(labelled, "labelled", _labelled_body({"classification": 0}))  # no classification
    assert status == 200 and body["outputs"][0]["datatype"] == "FP32" and body["outputs"][0]["shape"] == [2, 4]


def test_integers_and_a_model_that_does_not_batch(labelled):
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [5] * 15 + [9]},
                       {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [3] * 16}],
            "outputs": [{"name": "OUTPUT1", "parameters": {"classification": 3}}]}
    assert _post(labelled, "add_sub", body)[1]["outputs"][0]["data"] == ["6:15", "2:0", "2:1"]
    body = {"inputs": [{"name": "INPUT", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}],
            "outputs": [{"name": "OUTPUT", "parameters": {"classification": 2}}]}
    status, got = _post(labelled, "no_batch", body)  # OUTPUT = INPUT + 10, [2, 4]: over all 8 values
    assert status == 200 and got["outputs"][0]["shape"] == [2] and got["outputs"][0]["data"] == [
        "17.000000:7", "16.000000:6"]


@pytest.mark.parametrize(("model", "params", "words"), [
    ("labelled", {"classification": -1}, "'classification' must be a non-negative integer"),
    ("labelled", {"classification": "2"}, "'classification' must be a non-negative integer"),
    ("labelled", {"classification": True}, "'classification' must be a non-negative integer"),
    ("labelled", {"classification": 2, "shared_memory_region": "r", "shared_memory_byte_size": 64},
     "Output can't set both 'shared_memory_region' and 'classification'"),
])
def test_bad_requests(labelled, model, params, words):
    status, body = _post(labelled, model, _labelled_body(params))
    assert status == 400 and words in body["error"], body


def test_bytes_outputs_cannot_be_classified(labelled):
    client = httpclient.InferenceServerClient(labelled.http_url)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inp = httpclient.InferInput(name, [1, 16], "BYTES")
        inp.set_data_from_numpy(np.array([[b"1"] * 16], dtype=object))
        inputs.append(inp)
    with pytest.raises(InferenceServerException, match="unsupported type 'BYTES'"):
        client.infer("add_sub_string", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=1)])


def test_a_label_file_outside_the_model_directory_fails_the_load(start_server, tmp_path):
    add_constant(tmp_path / "escaping" / "1" / "model.onnx", 0.5)
    write_config(tmp_path / "escaping", 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
                 'output [ { name: "OUTPUT", data_type: TYPE_FP32, dims: [ 4 ], label_filename: "../x.txt" } ]\n')
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    status, _, body = server.request("POST", "/v2/repository/models/escaping/load", b"")
    assert status == 400 and "label_filename '../x.txt' must name a file in the model directory" in body.decode()


def test_an_ensemble_s_output_uses_its_own_labels(labelled):
    body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 3.0, 2.0, 0.0]}],
            "outputs": [{"name": "Y", "parameters": {"classification": 2}}]}
    status, got = _post(labelled, "labelled_ensemble", body)
    assert status == 200 and got["outputs"][0]["data"] == ["3.500000:1:b", "2.500000:2:c"], got
