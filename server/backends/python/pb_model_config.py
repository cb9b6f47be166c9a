"""The pure-python half of Triton's `triton_python_backend_utils`: ModelConfig, type helpers.

Triton splits its module the same way: `src/resources/triton_python_backend_utils.py` holds these
(config and data-type helpers, BYTES (de)serialisation), and the stub's bindings add Tensor,
InferenceRequest and the rest, which fuserve implements in `pb_utils.py`, re-exporting these.


A Python model may define `TritonPythonModel.auto_complete_config(config)`: it receives a
`ModelConfig` wrapping the model configuration in Triton's JSON form (protobuf field names,
`"data_type": "TYPE_FP32"`, `"dims": [4]`, every repeated field present, possibly empty) and returns
it after `add_input` / `add_output` / `set_max_batch_size` / `set_dynamic_batching` /
`set_model_transaction_policy`. The checks and error messages below are Triton's (python_backend
r24.10, `src/resources/triton_python_backend_utils.py`), because users see them when a model fails
to load and tests compare them. All errors are `ValueError`, as in Triton.

Differences from Triton, all lenient: missing `input` / `output` / `max_batch_size` / `name` keys
are treated as empty instead of raising `KeyError`; `dims` given as a tuple compare equal to the
same list; a property check that names an input without a `name` does not raise `KeyError`.
"""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import numpy as np

# ---- data types: TRITONSERVER_DataType codes (BOOL=1 .. BYTES=13, BF16=14) ----

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}  # Triton's table exactly: no TYPE_BF16 (numpy has none), TYPE_BOOL maps to Python's bool
_CODE_TO_NUMPY: dict[int, type] = {
    1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64, 6: np.int8, 7: np.int16,
    8: np.int32, 9: np.int64, 10: np.float16, 11: np.float32, 12: np.float64, 13: np.object_,
}
_NUMPY_TO_CODE: dict[type, int] = {t: c for c, t in _CODE_TO_NUMPY.items()} | {np.bytes_: 13}
_U32 = struct.Struct("<I")


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """numpy type for a config data_type ("TYPE_FP32"); KeyError for unknown ones, as in Triton."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type | None:
    """numpy type for a TRITONSERVER_DataType code; None when numpy has none (BF16, unknown)."""
    return _CODE_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    """TRITONSERVER_DataType code of a numpy dtype or type; None when Triton has none."""
    if data_type is None:
        return None
    try:
        return _NUMPY_TO_CODE.get(np.dtype(data_type).type)
    except TypeError:
        return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    """BYTES tensor -> its elements in C order, each as a 4-byte little-endian length and the bytes.

    This is the KServe V2 binary BYTES layout. Object elements that are not bytes become
    `str(x).encode("utf-8")`; numpy.bytes_ arrays lose trailing NULs (numpy strips them), which is
    why Triton recommends object arrays. Returns None for a non-BYTES dtype, as Triton does.
    """
    if input_tensor.size == 0:
        return b""
    is_object = input_tensor.dtype == np.object_
    if not is_object and input_tensor.dtype.type is not np.bytes_:
        return None
    parts: list[bytes] = []
    pack = _U32.pack
    for item in input_tensor.flat:
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: Any) -> np.ndarray:
    """Length-prefixed BYTES buffer (bytes or a uint8 array) -> 1-D object array of bytes."""
    buf = memoryview(encoded_tensor).cast("B")
    size = len(buf)
    items: list[bytes] = []
    offset = 0
    while offset < size:
        if offset + 4 > size:
            raise ValueError(f"truncated BYTES tensor: length prefix at offset {offset} of {size}")
        (length,) = _U32.unpack_from(buf, offset)
        offset += 4
        if offset + length > size:
            raise ValueError(f"truncated BYTES tensor: element of {length} bytes at offset {offset} of {size}")
        items.append(bytes(buf[offset : offset + length]))
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


# ---- the model configuration ----


class ModelConfig:
    """The model configuration handed to `auto_complete_config`, editable through Triton's methods.

    Triton builds it from the JSON text of the config; fuserve may also hand it a dict, which is
    deep-copied so that a failing auto-complete cannot leave a half-edited config behind.
    `_model_config` keeps Triton's attribute name: Triton's stub reads it back, and models in the
    wild peek at it.
    """

    def __init__(self, model_config: str | bytes | dict[str, Any]) -> None:
        if isinstance(model_config, dict):
            self._model_config: dict[str, Any] = copy.deepcopy(model_config)
        else:
            self._model_config = json.loads(model_config)
        if not isinstance(self._model_config, dict):
            raise ValueError("model configuration must be a JSON object")

    def as_dict(self) -> dict[str, Any]:
        """The configuration itself (not a copy), as Triton returns it; meant for reading."""
        return self._model_config

    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def _tensors(self, kind: str) -> list[dict[str, Any]]:
        tensors = self._model_config.setdefault(kind, [])
        if not isinstance(tensors, list):
            raise ValueError(f"model configuration field '{kind}' must be a list")
        return tensors

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Set max_batch_size unless the configuration already declared a larger one (an error)."""
        current = self._model_config.get("max_batch_size", 0)
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        """Turn on the dynamic batcher with defaults; an error when another scheduler is configured."""
        found = None
        if "sequence_batching" in self._model_config:
            found = "sequence_batching"
        elif "ensemble_scheduling" in self._model_config:
            found = "ensemble_scheduling"
        if found is not None:
            raise ValueError(
                f"Configuration specified scheduling_choice as '{found}', but auto-complete-config "
                f"function for model '{self._name()}' tries to set scheduling_choice as 'dynamic_batching'"
            )
        self._model_config.setdefault("dynamic_batching", {})

    def add_input(self, input: dict[str, Any]) -> None:
        """Add an input, or complete the declared input of that name; conflicting declarations raise."""
        self._add_tensor("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict[str, Any]) -> None:
        """Add an output, or complete the declared output of that name; conflicting declarations raise."""
        self._add_tensor("output", output, ("name", "data_type", "dims"))

    def _add_tensor(self, kind: str, tensor: dict[str, Any], valid: tuple[str, ...]) -> None:
        model = self._name()
        label = tensor.get("name", "")
        for prop in tensor:
            if prop not in valid:
                allowed = ", ".join(f"'{p}'" for p in valid[:-1]) + f" and '{valid[-1]}'"
                raise ValueError(
                    f"{kind} '{label}' in auto-complete-config function for model '{model}' "
                    f"contains property other than {allowed}."
                )
        if "name" not in tensor:
            raise ValueError(f"{kind} in auto-complete-config function for model '{model}' is missing 'name' property.")
        for prop in ("data_type", "dims"):
            if prop not in tensor:
                raise ValueError(
                    f"{kind} '{label}' in auto-complete-config function for model '{model}' "
                    f"is missing '{prop}' property."
                )

        for current in self._tensors(kind):
            if current.get("name") != label:
                continue
            current_type = current.get("data_type", "TYPE_INVALID")
            current_dims = list(current.get("dims") or [])
            new_dims = list(tensor["dims"])
            if current_type != "TYPE_INVALID" and current_type != tensor["data_type"]:
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype {current_type} "
                    f"for {kind} '{label}', model provides {tensor['data_type']}"
                )
            if current_dims and current_dims != new_dims:
                raise ValueError(
                    f"model '{model}', tensor '{label}': the model expects dims {new_dims} "
                    f"but the model configuration specifies dims {current_dims}"
                )
            if (
                kind == "input"
                and "optional" in current
                and "optional" in tensor
                and current["optional"] != tensor["optional"]
            ):
                raise ValueError(
                    f"model '{model}', tensor '{label}': the model expects optional {tensor['optional']} "
                    f"but the model configuration specifies optional {current['optional']}"
                )
            current["data_type"] = tensor["data_type"]
            current["dims"] = new_dims
            if kind == "input" and "optional" in tensor:
                current["optional"] = tensor["optional"]
            return

        added = dict(tensor)
        added["dims"] = list(tensor["dims"])
        self._tensors(kind).append(added)

    def set_model_transaction_policy(self, transaction_policy_dict: dict[str, Any]) -> None:
        """Set `model_transaction_policy` (only `decoupled`); changing an already-set value raises."""
        model = self._name()
        for prop in transaction_policy_dict:
            if prop != "decoupled":
                raise ValueError(
                    "model transaction property in auto-complete-config function for model "
                    f"'{model}' contains property other than 'decoupled'."
                )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = transaction_policy_dict["decoupled"]
            if "decoupled" in policy and policy["decoupled"] != wanted:
                raise ValueError(
                    "trying to change decoupled property in auto-complete-config for model "
                    f"'{model}', which is already set to '{policy['decoupled']}'."
                )
            policy["decoupled"] = wanted


def _config_entry(model_config: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    for entry in model_config.get(kind, ()):
        if entry.get("name") == name:
            return entry
    return None


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The `input` entry called `name` of a config dict (e.g. `json.loads(args["model_config"])`), or None."""
    return _config_entry(model_config, "input", name)


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The `output` entry called `name` of a config dict, or None."""
    return _config_entry(model_config, "output", name)


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    """Whether the config dict declares `model_transaction_policy { decoupled: true }`."""
    policy = model_config.get("model_transaction_policy")
    if isinstance(policy, dict):
        return bool(policy.get("decoupled", False))
    return False


def _auto_complete(model_class: type, config: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Run `model_class.auto_complete_config` the way Triton's stub does; return the resulting dict.

    For the server. Without the hook the config comes back unchanged (a copy). The hook is called
    on the class (it is a staticmethod in Triton's examples) and must return a `ModelConfig`.
    """
    wrapped = ModelConfig(config)
    hook = getattr(model_class, "auto_complete_config", None)
    if hook is None:
        return wrapped.as_dict()
    result = hook(wrapped)
    if not isinstance(result, ModelConfig):
        raise ValueError(
            f"auto_complete_config function in model '{model_name}' must return a valid pb.ModelConfig object."
        )
    return result.as_dict()
