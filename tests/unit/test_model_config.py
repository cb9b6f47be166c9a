"""config.pbtxt parsing, auto-complete, version policy and instance expansion."""

from __future__ import annotations

import model_builders as mb
import pytest
from google.protobuf import text_format

from server import dtypes
from server.errors import ModelLoadError
from server.model_config import (
    ModelConfig,
    ModelIO,
    TensorIO,
    autocomplete,
    backend_name,
    build_spec,
    instance_specs,
    parse_config_json,
    read_config,
    refuse_unimplemented,
    unimplemented_fields,
)
from server.repository import select_versions

FP32, INT64 = dtypes.BY_V2["FP32"], dtypes.BY_V2["INT64"]
IO = ModelIO(inputs=(TensorIO("x", FP32, (-1, 8)), TensorIO("ids", INT64, (-1, -1))),
             outputs=(TensorIO("y", FP32, (-1, 3)),))


def cfg(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def test_read_config_missing_file_is_empty(tmp_path):
    assert read_config(tmp_path) == ModelConfig()


def test_read_config_error_names_file_and_problem(tmp_path):
    (tmp_path / "config.pbtxt").write_text('name: "m"\nmax_batch_size: "eight"\n')
    with pytest.raises(ModelLoadError) as e:
        read_config(tmp_path)
    assert "config.pbtxt" in e.value.message and "max_batch_size" in e.value.message


def test_autocomplete_empty_config_batchable_model():
    done = autocomplete(ModelConfig(), IO, name="m", default_max_batch_size=4, where="w")
    assert done.name == "m" and done.max_batch_size == 4 and done.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in done.input] == [("x", [8]), ("ids", [-1])]
    assert [(o.name, list(o.dims)) for o in done.output] == [("y", [3])]


def test_autocomplete_non_batchable_model_keeps_full_shape():
    io = ModelIO((TensorIO("x", FP32, (2, 8)),), (TensorIO("y", FP32, (2, 3)),))
    done = autocomplete(ModelConfig(), io, name="m", default_max_batch_size=4, where="w")
    assert done.max_batch_size == 0 and list(done.input[0].dims) == [2, 8]


def test_autocomplete_partial_config_fills_only_missing():
    c = cfg('max_batch_size: 16\ninput [{ name: "x", data_type: TYPE_FP32, dims: [8] }]')
    done = autocomplete(c, IO, name="m", default_max_batch_size=4, where="w")
    assert done.max_batch_size == 16 and not done.HasField("dynamic_batching")
    assert [i.name for i in done.input] == ["x", "ids"] and [o.name for o in done.output] == ["y"]


@pytest.mark.parametrize("text, words", [
    ('max_batch_size: 4\ninput [{ name: "nope", data_type: TYPE_FP32, dims: [8] }]', ["nope", "not in the model"]),
    ('max_batch_size: 4\ninput [{ name: "x", data_type: TYPE_INT32, dims: [8] }]', ["x", "TYPE_INT32", "TYPE_FP32"]),
    ('max_batch_size: 4\ninput [{ name: "x", data_type: TYPE_FP32, dims: [7] }]', ["x", "[7]", "[8]"]),
])
def test_autocomplete_rejects_config_that_contradicts_the_model(text, words):
    with pytest.raises(ModelLoadError) as e:
        autocomplete(cfg(text), IO, name="m", default_max_batch_size=4, where="the/config.pbtxt")
    for w in words + ["the/config.pbtxt"]:
        assert w in e.value.message


def test_batching_needs_dynamic_first_dim():
    io = ModelIO((TensorIO("x", FP32, (2, 8)),), (TensorIO("y", FP32, (2, 3)),))
    with pytest.raises(ModelLoadError, match="max_batch_size"):
        autocomplete(cfg("max_batch_size: 8"), io, name="m", default_max_batch_size=4, where="w")


def test_build_spec_resolves_dtypes_and_indexes():
    done = autocomplete(ModelConfig(), IO, name="m", default_max_batch_size=4, where="w")
    spec = build_spec(done, "onnxruntime", instance_specs(done, 0), "w")
    assert spec.input_index["x"].dtype is FP32 and spec.input_index["ids"].dims == (-1,)
    assert spec.platform == "onnxruntime_onnx" and spec.max_batch_size == 4 and spec.dynamic_batching is not None
    with pytest.raises(TypeError):
        spec.input_index["z"] = spec.input_index["x"]  # frozen mapping


def test_build_spec_rejects_duplicate_and_unsupported():
    with pytest.raises(ModelLoadError, match="twice"):
        build_spec(cfg('input [{name: "a" data_type: TYPE_FP32 dims: [1]}, {name: "a" data_type: TYPE_FP32 '
                       'dims: [1]}]\noutput [{name: "b" data_type: TYPE_FP32 dims: [1]}]'), "onnxruntime", (), "w")
    with pytest.raises(ModelLoadError, match="TYPE_INVALID"):
        build_spec(cfg('input [{name: "a" dims: [1]}]\noutput [{name: "b" data_type: TYPE_FP32 dims: [1]}]'),
                   "onnxruntime", (), "w")


def test_instance_specs():
    c = cfg('name: "m"\ninstance_group [{ count: 2, kind: KIND_CPU }, { count: 1, kind: KIND_GPU, gpus: [0, 1] }]')
    on_cpu = instance_specs(c, gpu_count=0)
    assert [i.kind for i in on_cpu] == ["KIND_CPU"] * 3  # GPU group falls back to CPU without GPUs
    on_gpu = instance_specs(c, gpu_count=2)
    assert [(i.kind, i.device_id) for i in on_gpu] == [("KIND_CPU", -1)] * 2 + [("KIND_GPU", 0), ("KIND_GPU", 1)]
    assert [i.kind for i in instance_specs(cfg('name: "m"'), 0)] == ["KIND_CPU"]
    assert len(instance_specs(cfg('name: "m"'), 2)) == 2  # default: one instance per GPU


@pytest.mark.parametrize("policy, expected", [
    ("", [3]), ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
    ("version_policy: { all: {} }", [1, 2, 3]), ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
])
def test_select_versions(tmp_path, policy, expected):
    for v in ("1", "2", "3", "notaversion"):
        (tmp_path / v).mkdir()
    assert select_versions(tmp_path, cfg(policy)) == expected


def test_select_versions_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no version directories"):
        select_versions(tmp_path, ModelConfig())
    (tmp_path / "1").mkdir()
    with pytest.raises(ModelLoadError, match=r"\[2\]"):
        select_versions(tmp_path, cfg("version_policy: { specific: { versions: [2] } }"))


def test_backend_name(tmp_path):
    assert backend_name(cfg('platform: "onnxruntime_onnx"'), tmp_path) == "onnxruntime"
    assert backend_name(cfg('backend: "onnxruntime"'), tmp_path) == "onnxruntime"
    with pytest.raises(ModelLoadError, match="tensorflow_savedmodel"):
        backend_name(cfg('platform: "tensorflow_savedmodel"'), tmp_path)
    mb.add_constant(tmp_path / "1" / "model.onnx", 1.0)
    assert backend_name(ModelConfig(), tmp_path) == "onnxruntime"


def test_parse_config_json():
    assert parse_config_json('{"max_batch_size": "16"}', "w").max_batch_size == 16
    with pytest.raises(ModelLoadError, match="JSON"):
        parse_config_json('"parameters": {', "w")


@pytest.mark.parametrize(("text", "field"), [
    ("sequence_batching { iterative_sequence: true }", "sequence_batching.iterative_sequence"),
    ("sequence_batching { oldest { preserve_ordering: true } }", "sequence_batching.oldest.preserve_ordering"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [1] allow_ragged_batch: true } ]',
     "input[0] 'x'.allow_ragged_batch"),
    ('output [ { name: "y" data_type: TYPE_FP32 dims: [1] is_shape_tensor: true } ]',
     "output[0] 'y'.is_shape_tensor"),
    ("instance_group [ { count: 1 rate_limiter { priority: 1 } } ]", "instance_group[0].rate_limiter"),
    ("response_cache { enable: true }", "response_cache"),
    ("optimization { priority: PRIORITY_MAX }", "optimization.priority"),
    ('model_warmup [ { name: "w" } ]', "model_warmup"),
    ('parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "env.tar.gz" } }',
     "parameters 'EXECUTION_ENV_PATH'"),
])
def test_a_field_fuserve_does_not_implement_fails_the_load_naming_it(text, field):
    config = text_format.Parse(text, ModelConfig())
    with pytest.raises(ModelLoadError) as info:
        refuse_unimplemented(config, "m/config.pbtxt")
    assert info.value.message.startswith(f"m/config.pbtxt: {field} is not supported by fuserve")


def test_what_fuserve_implements_loads_and_triton_defaults_round_trip():
    config = text_format.Parse(
        'name: "m" backend: "python" max_batch_size: 8 '
        'input [ { name: "x" data_type: TYPE_FP32 dims: [4] optional: true } ] '
        'output [ { name: "y" data_type: TYPE_FP32 dims: [4] } ] '
        "dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 100 } "
        "instance_group [ { count: 2 kind: KIND_CPU } ] model_transaction_policy { decoupled: false } "
        "optimization { input_pinned_memory { enable: true } } "
        'parameters { key: "k" value: { string_value: "v" } }', ModelConfig())
    refuse_unimplemented(config, "m")  # nothing raised
    assert unimplemented_fields(config) == []

