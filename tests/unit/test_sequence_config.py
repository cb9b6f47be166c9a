"""sequence_batching -> SequenceSpec: the control tensors per value, initial states, strategies and
what fails the load."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from google.protobuf import text_format

from server.errors import ModelLoadError
from server.model_config import ModelConfig
from server.sequence_config import sequence_spec


def _spec(text: str, backend: str = "onnxruntime", version_dir=None, batch: int = 4):
    config = text_format.Parse(f"max_batch_size: {batch} sequence_batching {{ {text} }}", ModelConfig())
    return sequence_spec(config, backend, version_dir, "m")


def test_no_block_is_no_sequence_batcher():
    assert sequence_spec(ModelConfig(), "onnxruntime", None, "m") is None


def test_control_tensors_take_the_configured_forms_and_a_batch_dim():
    spec = _spec('control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 7] } ] },'
                 '{ name: "R" control [ { kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0.5, 1.5 ] } ] },'
                 '{ name: "E" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },'
                 '{ name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ]')
    by = {c.name: c for c in spec.controls}
    assert by["S"].true.dtype == np.int32 and by["S"].true.tolist() == [[7]] and by["S"].false.tolist() == [[0]]
    assert by["R"].true.dtype == np.float32 and by["R"].false.tolist() == [[0.5]]
    assert by["E"].true.dtype == np.bool_ and by["E"].true.tolist() == [[True]]
    corrid = spec.corrid(2**64 - 1)["C"]
    assert corrid.dtype == np.uint64 and corrid.tolist() == [[2**64 - 1]]
    assert spec.hidden_inputs == {"S", "R", "E", "C"}
    with pytest.raises(ValueError, match="takes a numeric one"):
        spec.corrid("abc")
    small = _spec('control_input [ { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT32 } ] } ]')
    with pytest.raises(ValueError, match="cannot hold"):
        small.corrid(2**31)
    assert small.corrid(2**31 - 1)["C"].tolist() == [[2**31 - 1]]
    unbatched = _spec('control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }'
                      ' ] } ]', batch=0)
    assert unbatched.controls[0].true.shape == (1,)


def test_strategies_slots_and_idle_default():
    direct = _spec("")
    assert (direct.strategy, direct.slots, direct.idle_us) == ("direct", 4, 1_000_000)
    oldest = _spec("max_sequence_idle_microseconds: 5 oldest { max_candidate_sequences: 9 "
                   "preferred_batch_size: [ 2, 1 ] max_queue_delay_microseconds: 100 }")
    assert (oldest.strategy, oldest.slots, oldest.preferred_batch_sizes, oldest.max_queue_delay_us, oldest.idle_us) == \
        ("oldest", 9, (1, 2), 100, 5)


def test_initial_states_zeros_or_a_data_file(tmp_path):
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "init").write_bytes(struct.pack("<2f", 1.5, -2.0))
    spec = _spec('state [ { input_name: "A" output_name: "B" data_type: TYPE_FP32 dims: [ 2 ] },'
                 '{ input_name: "C" output_name: "D" data_type: TYPE_FP32 dims: [ 2 ] initial_state: {'
                 ' data_type: TYPE_FP32 dims: [ 2 ] data_file: "init" } } ]', version_dir=tmp_path)
    assert spec.states[0].initial.tolist() == [[0.0, 0.0]]
    assert spec.states[1].initial.tolist() == [[1.5, -2.0]]
    assert spec.hidden_outputs == {"B", "D"}


def test_the_backlog_parameter_is_read_at_load_and_a_bad_one_fails_it():
    config = text_format.Parse('max_batch_size: 2 sequence_batching { } parameters { key: "fuserve_sequence_backlog" '
                               'value: { string_value: "7" } }', ModelConfig())
    assert sequence_spec(config, "onnxruntime", None, "m").backlog == 7
    config.parameters["fuserve_sequence_backlog"].string_value = "many"
    with pytest.raises(ModelLoadError, match="'fuserve_sequence_backlog' must be a non-negative integer"):
        sequence_spec(config, "onnxruntime", None, "m")


@pytest.mark.parametrize(("text", "backend", "message"), [
    ('control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_START } ] } ]', "onnxruntime",
     "needs exactly one of int32_false_true"),
    ('control_input [ { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ]',
     "onnxruntime", "TYPE_FP32; it must be one of"),
    ('state [ { input_name: "A" output_name: "B" data_type: TYPE_FP32 dims: [ 1 ] } ]', "python",
     "supported for ONNX and PyTorch models"),
    ('state [ { input_name: "A" output_name: "B" data_type: TYPE_FP32 dims: [ 2 ] initial_state: {'
     ' data_type: TYPE_FP32 dims: [ 2 ] data_file: "../../etc/passwd" } } ]', "onnxruntime", "is outside"),
    ('oldest { preferred_batch_size: [ 9 ] }', "onnxruntime", "must be between 1 and max_batch_size"),
])
def test_bad_blocks_fail_the_load_saying_why(tmp_path, text, backend, message):
    with pytest.raises(ModelLoadError, match=message):
        _spec(text, backend, tmp_path)
