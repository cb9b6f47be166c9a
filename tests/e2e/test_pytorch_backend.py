"""The PyTorch backend against a real server: TorchScript and torch.export programs, batching, BF16,
what it refuses to load, and the image model fed uint8 through the preprocess_image kernel."""

from __future__ import annotations

import json
import pickle
import threading
import zipfile

import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

torch = pytest.importorskip("torch", reason="the torch extra provides torch")

ADD_SUB_CONFIG = '''platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
          { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
'''


class AddSub(torch.nn.Module):
    def forward(self, a, b):
        return a + b, a - b


class Named(torch.nn.Module):  # returns a dict: outputs are matched by name
    def forward(self, x):
        return {"double": x * 2, "half": x / 2}


class Accumulate(torch.nn.Module):  # implicit state: forward(INPUT__0, STATE_IN__1) -> (OUTPUT__0, STATE_OUT__1)
    def forward(self, x, state):
        total = state + x
        return total, total


class Bf16Scale(torch.nn.Module):
    def forward(self, x):
        return (x.float() * 3).to(torch.bfloat16)


def mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


class Boom:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch_repo")
    ints = (torch.ones(2, 16, dtype=torch.int32), torch.ones(2, 16, dtype=torch.int32))
    (repo / "ts_add_sub" / "1").mkdir(parents=True)
    torch.jit.trace(AddSub(), ints).save(str(repo / "ts_add_sub" / "1" / "model.pt"))
    mb.write_config(repo / "ts_add_sub", ADD_SUB_CONFIG)

    (repo / "export_mlp" / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(mlp(), (torch.randn(2, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / "export_mlp" / "1" / "model.pt2"))
    mb.write_config(repo / "export_mlp", 'backend: "pytorch"\nmax_batch_size: 64\n'
                    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] } ]\n'
                    'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')

    (repo / "named" / "1").mkdir(parents=True)
    torch.jit.trace(Named(), (torch.ones(1, 3),), strict=False).save(str(repo / "named" / "1" / "model.pt"))
    mb.write_config(repo / "named", 'backend: "pytorch"\nmax_batch_size: 4\n'
                    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
                    'output [ { name: "half" data_type: TYPE_FP32 dims: [ 3 ] }, '
                    '{ name: "double" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')

    (repo / "bf16" / "1").mkdir(parents=True)
    torch.jit.trace(Bf16Scale(), (torch.ones(1, 4, dtype=torch.bfloat16),)).save(str(repo / "bf16" / "1" / "model.pt"))
    mb.write_config(repo / "bf16", 'backend: "pytorch"\nmax_batch_size: 4\n'
                    'input [ { name: "x" data_type: TYPE_BF16 dims: [ 4 ] } ]\n'
                    'output [ { name: "y" data_type: TYPE_BF16 dims: [ 4 ] } ]\n')

    (repo / "compiled_mlp" / "1").mkdir(parents=True)
    torch.export.save(program, str(repo / "compiled_mlp" / "1" / "model.pt2"))
    mb.write_config(repo / "compiled_mlp", (repo / "export_mlp" / "config.pbtxt").read_text()
                    + 'parameters { key: "torch_compile" value: { string_value: "true" } }\n')

    # refused at load, each beside the good ones
    (repo / "no_io" / "1").mkdir(parents=True)
    torch.jit.trace(AddSub(), ints).save(str(repo / "no_io" / "1" / "model.pt"))
    mb.write_config(repo / "no_io", 'platform: "pytorch_libtorch"\nmax_batch_size: 8\n')
    (repo / "pickled" / "1").mkdir(parents=True)
    with zipfile.ZipFile(repo / "pickled" / "1" / "model.pt", "w") as z:  # a torch.save-style archive
        z.writestr("archive/data.pkl", pickle.dumps(Boom(str(repo / "PWNED"))))
    mb.write_config(repo / "pickled", ADD_SUB_CONFIG)
    (repo / "bad_kernels" / "1").mkdir(parents=True)
    torch.jit.trace(AddSub(), ints).save(str(repo / "bad_kernels" / "1" / "model.pt"))
    mb.write_config(repo / "bad_kernels", ADD_SUB_CONFIG + 'parameters { key: "fuserve_kernels" '
                                                         'value: { string_value: "warp_drive" } }\n')
    (repo / "not_bert" / "1").mkdir(parents=True)  # asks for bert_encoder, has no BERT weights
    torch.jit.trace(AddSub(), ints).save(str(repo / "not_bert" / "1" / "model.pt"))
    mb.write_config(repo / "not_bert", ADD_SUB_CONFIG + 'parameters { key: "fuserve_kernels" '
                                                      'value: { string_value: "bert_encoder" } }\n')
    (repo / "torch_accumulate" / "1").mkdir(parents=True)
    torch.jit.script(Accumulate()).save(str(repo / "torch_accumulate" / "1" / "model.pt"))
    mb.write_config(repo / "torch_accumulate", 'backend: "pytorch"\nmax_batch_size: 4\n'
                    'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
                    'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
                    'sequence_batching { state [ { input_name: "STATE_IN__1" output_name: "STATE_OUT__1" '
                    'data_type: TYPE_FP32 dims: [ 2 ] } ] }\n')
    mb.generated(repo, "image_cnn")
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(repo)


def infer(server, mod, model, arrays: dict, datatypes: dict, outputs=None):
    client = mod.InferenceServerClient(server.http_url if mod is httpclient else server.grpc_url)
    try:
        inputs = []
        for name, arr in arrays.items():
            i = mod.InferInput(name, list(arr.shape), datatypes[name])
            i.set_data_from_numpy(arr)
            inputs.append(i)
        result = client.infer(model, inputs)
        return {name: result.as_numpy(name) for name in (outputs or [])}
    finally:
        client.close()


@pytest.mark.parametrize("mod", [httpclient, grpcclient])
def test_torchscript_and_export_programs_answer_as_torch_does(server, mod):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    got = infer(server, mod, "ts_add_sub", {"INPUT0": a, "INPUT1": b}, {"INPUT0": "INT32", "INPUT1": "INT32"},
                ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(got["OUTPUT0"], a + b)
    np.testing.assert_array_equal(got["OUTPUT1"], a - b)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    got = infer(server, mod, "export_mlp", {"x": x}, {"x": "FP32"}, ["y"])
    with torch.no_grad():
        np.testing.assert_allclose(got["y"], mlp()(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_torch_compile_at_load_answers_every_batch_size(server):
    for rows in (1, 5):
        x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        got = infer(server, httpclient, "compiled_mlp", {"x": x}, {"x": "FP32"}, ["y"])
        with torch.no_grad():
            np.testing.assert_allclose(got["y"], mlp()(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_dict_outputs_by_name_and_bf16(server):
    x = np.array([[1.0, 2.0, 4.0]], np.float32)
    got = infer(server, httpclient, "named", {"x": x}, {"x": "FP32"}, ["half", "double"])
    np.testing.assert_array_equal(got["half"], x / 2)
    np.testing.assert_array_equal(got["double"], x * 2)
    import ml_dtypes

    xb = np.array([[1.0, -2.5, 0.5, 8.0]], dtype=ml_dtypes.bfloat16)
    got = infer(server, grpcclient, "bf16", {"x": xb}, {"x": "BF16"}, ["y"])
    np.testing.assert_array_equal(got["y"].astype(np.float32), xb.astype(np.float32) * 3)


def test_concurrent_requests_are_batched(server):
    def stats() -> dict:
        return json.loads(server.request("GET", "/v2/models/ts_add_sub/stats")[2])["model_stats"][0]

    before = stats()
    errors: list = []

    def one(k: int) -> None:
        try:
            a = np.full((1, 16), k, np.int32)
            got = infer(server, httpclient, "ts_add_sub", {"INPUT0": a, "INPUT1": a},
                        {"INPUT0": "INT32", "INPUT1": "INT32"}, ["OUTPUT0"])
            assert (got["OUTPUT0"] == 2 * k).all()
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 16
    assert after["execution_count"] - before["execution_count"] < 16  # some ran together


def test_what_it_refuses_to_load(server, repo):
    index = {m["name"]: m for m in json.loads(server.request("POST", "/v2/repository/index")[2])}
    assert index["no_io"]["state"] == "UNAVAILABLE" and "declare its inputs and outputs" in index["no_io"]["reason"]
    assert index["pickled"]["state"] == "UNAVAILABLE" and "TorchScript" in index["pickled"]["reason"]
    assert not (repo / "PWNED").exists(), "the pickle was unpickled"
    assert index["bad_kernels"]["state"] == "UNAVAILABLE" and "warp_drive" in index["bad_kernels"]["reason"]
    assert index["not_bert"]["state"] == "UNAVAILABLE"
    assert "embeddings.word_embeddings.weight" in index["not_bert"]["reason"]
    assert index["ts_add_sub"]["state"] == "READY"


def test_image_model_takes_uint8_through_the_preprocess_kernel(server, repo):
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = infer(server, grpcclient, "image_cnn", {"image": images}, {"image": "UINT8"}, ["logits"])["logits"]
    program = torch.export.load(str(repo / "image_cnn" / "1" / "model.pt2")).module()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = program((x - mean) / std).numpy()
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_without_torch_the_load_failure_names_the_extra(start_server, repo, tmp_path):
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    small = tmp_path / "repo"
    small.mkdir()
    for name in ("ts_add_sub",):
        (small / name / "1").mkdir(parents=True)
        (small / name / "1" / "model.pt").write_bytes((repo / name / "1" / "model.pt").read_bytes())
        (small / name / "config.pbtxt").write_text((repo / name / "config.pbtxt").read_text())
    server = start_server(small, env={"PYTHONPATH": str(tmp_path / "no_torch")})
    index = {m["name"]: m for m in json.loads(server.request("POST", "/v2/repository/index")[2])}
    assert index["ts_add_sub"]["state"] == "UNAVAILABLE"
    assert "fuserve[torch]" in index["ts_add_sub"]["reason"]


def test_implicit_state_on_a_torchscript_model(server):
    """The server feeds STATE_IN__1 (zeros at START) and keeps STATE_OUT__1 per sequence: two
    interleaved sequences each get their own running sum."""
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def send(sid: int, values: list[float], **flags) -> list[float]:
        t = grpcclient.InferInput("INPUT__0", [1, 2], "FP32")
        t.set_data_from_numpy(np.array([values], dtype=np.float32))
        result = client.infer("torch_accumulate", [t], sequence_id=sid, client_timeout=60, **flags)
        return result.as_numpy("OUTPUT__0")[0].tolist()

    assert send(1, [1, 2], sequence_start=True) == [1, 2]
    assert send(2, [10, 10], sequence_start=True) == [10, 10]
    assert send(1, [1, 2]) == [2, 4]
    assert send(2, [-1, 5], sequence_end=True) == [9, 15]
    assert send(1, [0.5, 0], sequence_end=True) == [2.5, 4]
    client.close()
