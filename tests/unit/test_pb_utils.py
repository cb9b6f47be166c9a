"""fuserve's triton_python_backend_utils: the API Triton Python models call, checked against
Triton's (python_backend r24.10) names, defaults, return types and error messages."""

from __future__ import annotations

import asyncio
import json
import logging
import struct

import ml_dtypes
import numpy as np
import pytest

from server.backends.python import pb_model_config, pb_utils
from server.backends.python.pb_utils import (
    InferenceRequest,
    InferenceResponse,
    ModelConfig,
    Tensor,
    TritonError,
    TritonModelException,
)


@pytest.fixture(autouse=True)
def _no_bridge():
    pb_utils.set_bridge(None)
    yield
    pb_utils.set_bridge(None)


def _request(**overrides) -> InferenceRequest:
    kwargs = dict(model_name="m", inputs=[Tensor("IN", np.zeros(2, np.float32))], requested_output_names=["OUT"])
    kwargs.update(overrides)
    return InferenceRequest(**kwargs)


# ---- tensors ----


def test_tensor_holds_the_array_without_copying():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = Tensor("INPUT0", array)
    assert tensor.name() == "INPUT0"
    assert tensor.as_numpy() is array
    assert tensor.shape() == [2, 3]
    assert tensor.triton_dtype() == 11  # TRITONSERVER_TYPE_FP32
    assert tensor.is_cpu() is True


def test_tensor_makes_a_strided_array_contiguous_and_accepts_lists():
    strided = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]
    tensor = Tensor("x", strided)
    assert tensor.as_numpy().flags.c_contiguous
    np.testing.assert_array_equal(tensor.as_numpy(), strided)
    listed = Tensor("y", [1, 2, 3])
    assert listed.as_numpy().tolist() == [1, 2, 3]
    assert listed.triton_dtype() == 9  # int64


def test_tensor_rejects_empty_name_and_unsupported_dtypes():
    with pytest.raises(TritonModelException, match="Tensor name cannot be an empty string"):
        Tensor("", np.zeros(1))
    # Triton rejects numpy unicode arrays: BYTES must be object or numpy.bytes_
    with pytest.raises(TritonModelException, match="NumPy dtype is not supported"):
        Tensor("s", np.array(["a", "b"]))
    with pytest.raises(TritonModelException, match="NumPy dtype is not supported"):
        Tensor("c", np.zeros(2, np.complex64))


def test_bytes_tensors_keep_object_and_bytes_arrays():
    objects = np.array([b"ab", "c\u00e9", 7], dtype=np.object_)
    tensor = Tensor("B", objects)
    assert tensor.as_numpy() is objects
    assert tensor.triton_dtype() == 13
    fixed = np.array([b"x", b"yz"])
    assert Tensor("S", fixed).triton_dtype() == 13
    with pytest.raises(TritonModelException, match="DLPack does not have support for string tensors"):
        tensor.to_dlpack()
    normalised = pb_utils._bytes_object_array(np.array([[b"a", b"bc"]]))
    assert normalised.dtype == np.object_ and normalised.shape == (1, 2)
    assert [type(x) for x in normalised.flat] == [bytes, bytes]
    assert pb_utils._bytes_object_array(objects).tolist() == [b"ab", "c\u00e9".encode(), b"7"]


def test_dlpack_roundtrip_shares_memory():
    array = np.arange(4, dtype=np.float64)
    tensor = Tensor("A", array)
    back = Tensor.from_dlpack("B", tensor.to_dlpack())
    assert back.name() == "B"
    assert np.shares_memory(back.as_numpy(), array)
    from_protocol = Tensor.from_dlpack("C", tensor)  # an object with __dlpack__ and __dlpack_device__
    assert np.shares_memory(from_protocol.as_numpy(), array)
    array[0] = 42.0
    assert back.as_numpy()[0] == 42.0


def test_dlpack_of_a_read_only_array_stays_zero_copy():
    frozen = np.frombuffer(struct.pack("<3i", 1, 2, 3), dtype=np.int32)
    assert not frozen.flags.writeable
    back = Tensor.from_dlpack("R", Tensor("R", frozen).to_dlpack())
    assert back.as_numpy().tolist() == [1, 2, 3]
    assert np.shares_memory(back.as_numpy(), frozen)


def test_dlpack_with_torch():
    torch = pytest.importorskip("torch")
    tensor = Tensor("T", np.arange(3, dtype=np.float32))
    as_torch = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    as_torch[1] = 9.0
    assert tensor.as_numpy()[1] == 9.0
    from_torch = Tensor.from_dlpack("U", torch.arange(4, dtype=torch.int64))
    assert from_torch.as_numpy().tolist() == [0, 1, 2, 3]
    assert from_torch.triton_dtype() == 9


def test_from_dlpack_refusals():
    with pytest.raises(TritonModelException, match="not contiguous"):
        Tensor.from_dlpack("t", np.arange(6).reshape(2, 3).T)
    with pytest.raises(TritonModelException, match="Tensor must be a DLPack capsule"):
        Tensor.from_dlpack("t", [1, 2])
    with pytest.raises(TritonModelException, match="empty string"):
        Tensor.from_dlpack("", np.zeros(1))

    class OnGpu:
        def __dlpack__(self, **_):
            raise AssertionError("must not be asked for its data")

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(TritonModelException, match="GPU"):
        Tensor.from_dlpack("g", OnGpu())


def test_bf16_tensors():
    bf16 = np.zeros(2, dtype=ml_dtypes.bfloat16)
    tensor = Tensor("H", bf16)
    assert tensor.triton_dtype() == 14
    assert tensor.as_numpy() is bf16
    with pytest.raises(TritonModelException, match="BF16"):
        tensor.to_dlpack()


def test_tensor_lookup_by_name():
    request = _request(inputs=[Tensor("A", np.zeros(1)), Tensor("B", np.ones(1))])
    assert pb_utils.get_input_tensor_by_name(request, "B").as_numpy()[0] == 1.0
    assert pb_utils.get_input_tensor_by_name(request, "C") is None
    response = InferenceResponse(output_tensors=[Tensor("OUT", np.ones(1))])
    assert pb_utils.get_output_tensor_by_name(response, "OUT").name() == "OUT"
    assert pb_utils.get_output_tensor_by_name(response, "A") is None


# ---- type helpers ----

TABLE = [
    ("TYPE_BOOL", np.bool_, 1), ("TYPE_UINT8", np.uint8, 2), ("TYPE_UINT16", np.uint16, 3),
    ("TYPE_UINT32", np.uint32, 4), ("TYPE_UINT64", np.uint64, 5), ("TYPE_INT8", np.int8, 6),
    ("TYPE_INT16", np.int16, 7), ("TYPE_INT32", np.int32, 8), ("TYPE_INT64", np.int64, 9),
    ("TYPE_FP16", np.float16, 10), ("TYPE_FP32", np.float32, 11), ("TYPE_FP64", np.float64, 12),
    ("TYPE_STRING", np.object_, 13),
]


@pytest.mark.parametrize(("config_type", "numpy_type", "code"), TABLE)
def test_type_helpers_follow_tritons_table(config_type, numpy_type, code):
    assert np.dtype(pb_utils.triton_string_to_numpy(config_type)) == np.dtype(numpy_type)
    assert pb_utils.triton_to_numpy_type(code) is numpy_type
    assert pb_utils.numpy_to_triton_type(numpy_type) == code
    assert pb_utils.numpy_to_triton_type(np.dtype(numpy_type)) == code


def test_type_helper_edges():
    assert pb_utils.triton_string_to_numpy("TYPE_BOOL") is bool  # Triton's table says bool, not np.bool_
    with pytest.raises(KeyError):
        pb_utils.triton_string_to_numpy("TYPE_BF16")
    assert pb_utils.triton_to_numpy_type(14) is None
    assert pb_utils.numpy_to_triton_type(np.bytes_) == 13
    assert pb_utils.numpy_to_triton_type(np.dtype("S7")) == 13
    assert pb_utils.numpy_to_triton_type(np.str_) is None
    assert pb_utils.numpy_to_triton_type(None) is None


def test_serialize_and_deserialize_bytes():
    tensor = np.array([[b"ab", "\u00e9"], [b"", 5]], dtype=np.object_)
    encoded = pb_utils.serialize_byte_tensor(tensor)
    expected = b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x005"
    assert encoded == expected
    decoded = pb_utils.deserialize_bytes_tensor(encoded)
    assert decoded.dtype == np.object_
    assert decoded.tolist() == [b"ab", b"\xc3\xa9", b"", b"5"]
    as_uint8 = np.frombuffer(encoded, dtype=np.uint8)  # what Triton's stub passes it
    assert pb_utils.deserialize_bytes_tensor(as_uint8).tolist() == decoded.tolist()
    assert pb_utils.serialize_byte_tensor(np.array([b"xy", b"z"])) == b"\x02\x00\x00\x00xy\x01\x00\x00\x00z"
    assert pb_utils.serialize_byte_tensor(np.zeros(2, np.float32)) is None
    assert pb_utils.serialize_byte_tensor(np.array([], dtype=np.object_)) == b""
    assert pb_utils.deserialize_bytes_tensor(b"").shape == (0,)
    with pytest.raises(ValueError, match="truncated"):
        pb_utils.deserialize_bytes_tensor(b"\x05\x00\x00\x00abc")
    with pytest.raises(ValueError, match="truncated"):
        pb_utils.deserialize_bytes_tensor(b"\x01\x00")


def test_constants():
    assert pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START == 1
    assert pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END == 2
    assert pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL == 1
    assert pb_utils.TRITONSERVER_REQUEST_RELEASE_ALL == 1
    assert pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE == 2
    assert pb_utils.TRITONSERVER_MEMORY_GPU == 0 and pb_utils.TRITONSERVER_MEMORY_CPU == 1


# ---- ModelConfig ----


def _config(**fields) -> ModelConfig:
    base = {"name": "m", "max_batch_size": 0, "input": [], "output": []}
    base.update(fields)
    return ModelConfig(json.dumps(base))


def test_model_config_adds_and_completes_tensors():
    config = _config(input=[{"name": "IN0", "data_type": "TYPE_INVALID", "dims": []}])
    config.add_input({"name": "IN0", "data_type": "TYPE_FP32", "dims": [4], "optional": True})
    config.add_input({"name": "IN1", "data_type": "TYPE_INT32", "dims": (2,)})
    config.add_output({"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]})
    config.add_output({"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]})  # same again: fine
    as_dict = config.as_dict()
    assert as_dict["input"] == [
        {"name": "IN0", "data_type": "TYPE_FP32", "dims": [4], "optional": True},
        {"name": "IN1", "data_type": "TYPE_INT32", "dims": [2]},
    ]
    assert as_dict["output"] == [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]}]
    json.dumps(as_dict)  # stays JSON-serialisable for the server


def test_model_config_conflicts_raise_tritons_messages():
    config = _config(
        input=[{"name": "IN", "data_type": "TYPE_FP32", "dims": [4], "optional": False}],
        output=[{"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]}],
    )
    with pytest.raises(ValueError, match=r"unable to load model 'm', configuration expects datatype TYPE_FP32 "
                                         r"for input 'IN', model provides TYPE_INT8"):
        config.add_input({"name": "IN", "data_type": "TYPE_INT8", "dims": [4]})
    with pytest.raises(ValueError, match=r"model 'm', tensor 'IN': the model expects dims \[3\] but the model "
                                         r"configuration specifies dims \[4\]"):
        config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [3]})
    optional = "the model expects optional True but the model configuration specifies optional False"
    with pytest.raises(ValueError, match=optional):
        config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [4], "optional": True})
    with pytest.raises(ValueError, match="for output 'OUT', model provides TYPE_FP16"):
        config.add_output({"name": "OUT", "data_type": "TYPE_FP16", "dims": [4]})
    with pytest.raises(ValueError, match="contains property other than 'name', 'data_type', 'dims' and 'optional'."):
        config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [1], "format": "FORMAT_NCHW"})
    with pytest.raises(ValueError, match="contains property other than 'name', 'data_type' and 'dims'."):
        config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [1], "optional": True})
    with pytest.raises(ValueError, match="input in auto-complete-config function for model 'm' is missing 'name'"):
        config.add_input({"data_type": "TYPE_FP32", "dims": [1]})
    with pytest.raises(ValueError, match="output 'Y' in auto-complete-config function for model 'm' is missing 'dims'"):
        config.add_output({"name": "Y", "data_type": "TYPE_FP32"})
    assert len(config.as_dict()["input"]) == 1  # nothing was added by the failures


def test_model_config_batching_and_policy():
    config = _config(max_batch_size=8)
    config.set_max_batch_size(16)
    assert config.as_dict()["max_batch_size"] == 16
    with pytest.raises(ValueError, match="configuration specified max_batch_size 16, but in auto-complete-config "
                                         "function for model 'm' specified max_batch_size 4"):
        config.set_max_batch_size(4)
    config.set_dynamic_batching()
    assert config.as_dict()["dynamic_batching"] == {}
    sequence = _config(sequence_batching={})
    with pytest.raises(ValueError, match="scheduling_choice as 'sequence_batching'"):
        sequence.set_dynamic_batching()
    config.set_model_transaction_policy({"decoupled": False})
    config.set_model_transaction_policy({"decoupled": False})
    assert config.as_dict()["model_transaction_policy"] == {"decoupled": False}
    with pytest.raises(ValueError, match="trying to change decoupled property"):
        config.set_model_transaction_policy({"decoupled": True})
    with pytest.raises(ValueError, match="contains property other than 'decoupled'"):
        config.set_model_transaction_policy({"other": 1})


def test_model_config_from_a_dict_copies_it():
    source = {"name": "m", "max_batch_size": 0, "input": [], "output": []}
    config = ModelConfig(source)
    config.add_input({"name": "I", "data_type": "TYPE_FP32", "dims": [1]})
    assert source["input"] == []


def test_config_lookups():
    cfg = {"input": [{"name": "A", "data_type": "TYPE_FP32"}], "output": [{"name": "B", "data_type": "TYPE_INT8"}]}
    assert pb_utils.get_input_config_by_name(cfg, "A")["data_type"] == "TYPE_FP32"
    assert pb_utils.get_input_config_by_name(cfg, "B") is None
    assert pb_utils.get_output_config_by_name(cfg, "B")["data_type"] == "TYPE_INT8"
    assert pb_utils.get_output_config_by_name({}, "B") is None
    assert pb_utils.using_decoupled_model_transaction_policy(cfg) is False
    assert pb_utils.using_decoupled_model_transaction_policy({"model_transaction_policy": {"decoupled": True}})


def test_auto_complete_helper():
    class Model:
        @staticmethod
        def auto_complete_config(config):
            config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [4]})
            config.set_max_batch_size(4)
            return config

    class Broken:
        @staticmethod
        def auto_complete_config(config):
            return config.as_dict()

    base = {"name": "m", "max_batch_size": 0, "input": [], "output": []}
    done = pb_model_config._auto_complete(Model, base, "m")
    assert done["max_batch_size"] == 4 and done["input"][0]["name"] == "IN"
    assert pb_model_config._auto_complete(object, base, "m") == base
    with pytest.raises(ValueError, match="function in model 'm' must return a valid pb.ModelConfig object"):
        pb_model_config._auto_complete(Broken, base, "m")


# ---- requests ----


def test_bls_request_accessors_and_defaults():
    a, b = Tensor("A", np.zeros(1)), Tensor("B", np.zeros(1))
    request = InferenceRequest(model_name="add_sub", inputs=[a, b], requested_output_names=["O1", "O0", "O1"])
    assert request.inputs() == [a, b]
    assert request.requested_output_names() == {"O0", "O1"}
    assert request.request_id() == ""
    assert request.correlation_id() == 0
    assert request.flags() == 0
    assert request.timeout() == 0
    assert request.parameters() == "{}"
    assert request.is_cancelled() is False
    assert request.trace().get_context() is None
    assert request._model_version == -1


def test_bls_request_all_arguments():
    request = InferenceRequest(
        request_id="1", correlation_id="seq-7", inputs=[], requested_output_names=[], model_name="m",
        model_version=2, flags=pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, timeout=5,
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        parameters={"key": "value", "n": 3, "on": True},
    )
    assert request.request_id() == "1"
    assert request.correlation_id() == "seq-7"
    assert request.flags() == 1 and request.timeout() == 5
    assert request.parameters() == '{"key": "value", "n": 3, "on": true}'  # json.dumps' spacing, as Triton
    assert json.loads(_request(parameters='{"a":1}').parameters()) == {"a": 1}
    request.set_flags(3)
    assert request.flags() == 3


def test_bls_request_validation():
    with pytest.raises(TypeError, match="model_name"):
        InferenceRequest(inputs=[], requested_output_names=[])
    with pytest.raises(TritonModelException, match="Expect parameters values to have type bool/int/str"):
        _request(parameters={"x": 1.5})
    with pytest.raises(TritonModelException, match="Expect parameters keys to have type str"):
        _request(parameters={1: "x"})
    with pytest.raises(TritonModelException, match="Expect dict"):
        _request(parameters=[("a", 1)])
    with pytest.raises(TritonModelException, match="JSON object"):
        _request(parameters="[1]")
    with pytest.raises(TritonModelException, match="Correlation ID must be integer or string"):
        _request(correlation_id=1.5)
    with pytest.raises(TritonModelException, match="Requested output name for request with id 'r' and model name 'm'"):
        _request(request_id="r", requested_output_names=[""])
    with pytest.raises(TritonModelException, match="Input tensor for request with id '' and model name 'm' should not"):
        _request(inputs=[None])


def test_incoming_request():
    cancelled = [False]
    tensor = Tensor("IN", np.zeros(1))
    inputs = [tensor]
    request = InferenceRequest._incoming(inputs, ("OUT",), "id-1", 5, '{"k":"v"}', 2, lambda: cancelled[0])
    assert request.inputs() is inputs
    assert request.requested_output_names() == {"OUT"}
    assert request.request_id() == "id-1"
    assert request.correlation_id() == 5
    assert request.parameters() == '{"k":"v"}'  # as given, not re-encoded
    assert request.flags() == pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
    assert request.is_cancelled() is False
    cancelled[0] = True
    assert request.is_cancelled() is True
    plain = InferenceRequest._incoming([], [], "", 0, "{}")
    assert plain.is_cancelled() is False and plain.timeout() == 0
    assert plain._release_flags == pb_utils.TRITONSERVER_REQUEST_RELEASE_ALL
    plain.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
    assert plain._release_flags == 2


def test_response_sender_is_refused():
    with pytest.raises(TritonModelException, match="decoupled"):
        _request().get_response_sender()


# ---- BLS through the bridge ----


def test_exec_without_a_bridge_returns_an_error_response():
    response = _request().exec()
    assert isinstance(response, InferenceResponse)
    assert response.has_error()
    assert "BLS is not available" in response.error().message()
    assert response.output_tensors() == []


def test_async_exec_without_a_bridge_returns_an_error_response():
    async def main():
        return await _request().async_exec()

    assert asyncio.run(main()).has_error()


class FakeBridge:
    def __init__(self):
        self.calls = []

    def _answer(self, request, decoupled):
        self.calls.append((request._model_name, decoupled))
        if request._model_name == "boom":
            raise RuntimeError("model 'boom' exploded")
        if request._model_name == "outside":
            raise TritonModelException("BLS is only supported during the 'execute' function.")
        if decoupled:
            return iter([InferenceResponse(output_tensors=[Tensor("OUT", np.array([1]))]), InferenceResponse()])
        doubled = request.inputs()[0].as_numpy() * 2
        return InferenceResponse(output_tensors=[Tensor("OUT", doubled)])

    def exec(self, request, decoupled):
        return self._answer(request, decoupled)

    async def async_exec(self, request, decoupled):
        await asyncio.sleep(0)
        return self._answer(request, decoupled)


def test_exec_goes_through_the_bridge():
    bridge = FakeBridge()
    pb_utils.set_bridge(bridge)
    request = _request(inputs=[Tensor("IN", np.array([1.0, 2.0]))])
    response = request.exec()
    assert not response.has_error()
    assert pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy().tolist() == [2.0, 4.0]
    streamed = list(request.exec(decoupled=True))
    assert len(streamed) == 2 and not streamed[1].output_tensors()
    assert bridge.calls == [("m", False), ("m", True)]
    [error] = list(_request(model_name="boom").exec(decoupled=True))  # an error: an iterator over it alone
    assert error.has_error() and error.error().message() == "model 'boom' exploded"
    failed = _request(model_name="boom").exec()
    assert failed.has_error() and failed.error().message() == "model 'boom' exploded"
    with pytest.raises(TritonModelException, match="only supported during the 'execute'"):
        _request(model_name="outside").exec()


def test_async_exec_runs_concurrently_through_the_bridge():
    bridge = FakeBridge()
    pb_utils.set_bridge(bridge)

    async def main():
        pending = [_request(inputs=[Tensor("IN", np.array([float(i)]))]).async_exec() for i in range(3)]
        assert all(isinstance(p, asyncio.Task) for p in pending)  # in flight already, like Triton's futures
        return await asyncio.gather(*pending)

    responses = asyncio.run(main())
    assert [r.output_tensors()[0].as_numpy().tolist() for r in responses] == [[0.0], [2.0], [4.0]]
    assert len(bridge.calls) == 3


# ---- responses and errors ----


def test_inference_response():
    empty = InferenceResponse()
    assert empty.output_tensors() == [] and not empty.has_error() and empty.error() is None
    assert empty.parameters() == "{}"
    error = TritonError("bad input", TritonError.INVALID_ARG)
    failed = InferenceResponse(error=error)
    assert failed.has_error() and failed.error() is error
    with_params = InferenceResponse(output_tensors=[Tensor("O", np.zeros(1))], parameters={"p": 1})
    assert json.loads(with_params.parameters()) == {"p": 1}
    with pytest.raises(TritonModelException, match="Output tensor for inference response should not be empty"):
        InferenceResponse(output_tensors=[None])
    with pytest.raises(TypeError):
        InferenceResponse(output_tensors=[np.zeros(1)])
    with pytest.raises(TypeError):
        InferenceResponse(error="a string")


@pytest.mark.parametrize(
    ("name", "value"),
    [("UNKNOWN", 0), ("INTERNAL", 1), ("NOT_FOUND", 2), ("INVALID_ARG", 3), ("UNAVAILABLE", 4),
     ("UNSUPPORTED", 5), ("ALREADY_EXISTS", 6), ("CANCELLED", 7)],
)
def test_triton_error_codes(name, value):
    code = getattr(TritonError, name)
    assert int(code) == value
    error = TritonError("msg", code)
    assert error.code() == code and error.message() == "msg" and error._code_explicit


def test_triton_error_default_and_invalid_codes():
    default = TritonError("oops")
    assert default.code() == TritonError.INTERNAL
    assert default._code_explicit is False
    assert TritonError("oops", TritonError.INTERNAL)._code_explicit is True
    with pytest.raises(ValueError, match="unknown TritonError code 99"):
        TritonError("x", 99)
    with pytest.raises(TypeError):
        TritonError(None)
    with pytest.raises(TypeError):
        TritonError("x", None)


# ---- logging, model dir, what is unsupported ----


def test_logger_maps_onto_python_logging(caplog):
    caplog.set_level(logging.DEBUG, logger="fuserve.model")
    logger = pb_utils.Logger
    logger.log_info("info msg")
    logger.log_warn("warn msg")
    logger.log_error("error msg")
    logger.log_verbose("verbose msg")
    logger.log("plain msg")
    logger.log("specific msg", logger.WARNING)
    logger.log("enum msg", pb_utils.Logger.LogLevel.ERROR)
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        ("fuserve.model", logging.INFO, "info msg"),
        ("fuserve.model", logging.WARNING, "warn msg"),
        ("fuserve.model", logging.ERROR, "error msg"),
        ("fuserve.model", logging.DEBUG, "verbose msg"),
        ("fuserve.model", logging.INFO, "plain msg"),
        ("fuserve.model", logging.WARNING, "specific msg"),
        ("fuserve.model", logging.ERROR, "enum msg"),
    ]
    assert {r.filename for r in caplog.records} == {"test_pb_utils.py"}  # the caller, like Triton's file:line
    with pytest.raises(TypeError):
        logger.log("x", 17)


def test_get_model_dir(tmp_path):
    with pytest.raises(TritonModelException, match="only available inside"):
        pb_utils.get_model_dir()
    with pb_utils._model_dir_scope(tmp_path):
        assert pb_utils.get_model_dir() == str(tmp_path)
    with pytest.raises(TritonModelException):
        pb_utils.get_model_dir()


def test_unsupported_apis_raise_clearly():
    assert int(pb_utils.MetricFamily.COUNTER) == 0 and int(pb_utils.MetricFamily.HISTOGRAM) == 2
    with pytest.raises(TritonModelException, match="custom metrics are not supported"):
        pb_utils.MetricFamily(name="latency", description="d", kind=pb_utils.MetricFamily.COUNTER)
    for call in (lambda: pb_utils.load_model("x"), lambda: pb_utils.unload_model("x"),
                 lambda: pb_utils.is_model_ready("x")):
        with pytest.raises(TritonModelException, match="model loading API is not supported"):
            call()


def test_bytes_are_accepted_where_triton_takes_a_std_string():
    # pybind11 turns bytes into std::string: Triton's BLS example reads the callee's name from a
    # BYTES input (bytes) and passes it straight to InferenceRequest(model_name=...).
    name = np.array([b"add_sub"], dtype=np.object_)[0]
    request = _request(model_name=name, request_id=b"r1", requested_output_names=[b"OUT"])
    assert request._model_name == "add_sub" and request.request_id() == "r1"
    assert request.requested_output_names() == {"OUT"}
    assert Tensor(b"IN", np.zeros(1)).name() == "IN"
    assert TritonError(b"bad").message() == "bad"
    with pytest.raises(TypeError):
        Tensor(3, np.zeros(1))


ADD_SUB_MODEL = '''
import json
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "OUTPUT0")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            if in_1 is None:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("INPUT1 missing", pb_utils.TritonError.INVALID_ARG)))
                continue
            out = pb_utils.Tensor("OUTPUT0", (in_0.as_numpy() + in_1.as_numpy()).astype(self.dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def test_a_triton_model_runs_unchanged(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", pb_utils)
    namespace: dict = {}
    exec(compile(ADD_SUB_MODEL, "model.py", "exec"), namespace)
    model = namespace["TritonPythonModel"]()
    config = {"name": "add_sub", "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP16", "dims": [2]}]}
    model.initialize({"model_config": json.dumps(config)})
    two = [Tensor("INPUT0", np.ones(2, np.float32)), Tensor("INPUT1", np.ones(2, np.float32))]
    requests = [
        InferenceRequest._incoming(two, ["OUTPUT0"], "1", 0, "{}"),
        InferenceRequest._incoming(two[:1], ["OUTPUT0"], "2", 0, "{}"),
    ]
    ok, bad = model.execute(requests)
    assert ok.output_tensors()[0].as_numpy().dtype == np.float16
    assert ok.output_tensors()[0].as_numpy().tolist() == [2.0, 2.0]
    assert bad.error().code() == TritonError.INVALID_ARG and bad.error().message() == "INPUT1 missing"
