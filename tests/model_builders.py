"""Small real ONNX models for the tests, built with the onnx helper API (nothing is mocked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
OPSET = 17

# V2 datatype -> ONNX element type, for every type the identity model carries.
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16, "BYTES": TensorProto.STRING,
}


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _model(nodes: list, name: str, inputs: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def identity(path: Path, v2: str) -> Path:
    """IN_<T> -> OUT_<T> for V2 datatype T, dims [batch, n] (shipped with no config: auto-complete)."""
    et = ONNX_TYPES[v2]
    x = helper.make_tensor_value_info(f"IN_{v2}", et, ["batch", "n"])
    y = helper.make_tensor_value_info(f"OUT_{v2}", et, ["batch", "n"])
    return save(_model([helper.make_node("Identity", [x.name], [y.name])], f"identity_{v2}", [x], [y]), path)


def add_constant(path: Path, constant: float, *, batch: bool = True) -> Path:
    """FP32 INPUT [batch, 4] -> OUTPUT = INPUT + constant (tells versions apart)."""
    shape = ["batch", 4] if batch else [2, 4]
    x = helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, shape)
    c = numpy_helper.from_array(np.array([constant], dtype=np.float32), "C")
    return save(_model([helper.make_node("Add", ["INPUT", "C"], ["OUTPUT"])], "add_constant", [x], [y], [c]), path)


def slow(path: Path, matmuls: int = 300, width: int = 512) -> Path:
    """FP32 INPUT [batch, width] -> a chain of `matmuls` MatMuls: a model that takes a while."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    x = helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", width])
    nodes, prev = [], "INPUT"
    for i in range(matmuls):
        out = "OUTPUT" if i == matmuls - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "W"], [out]))
        prev = out
    return save(_model(nodes, "slow", [x], [y], [numpy_helper.from_array(w, "W")]), path)


def generated(repo: Path, name: str, as_name: str | None = None) -> None:
    """Copy a bundled model (config.pbtxt + its generated model file) into `repo`, optionally renamed."""
    src = ROOT / "model_repo" / name

    def model_files() -> list[Path]:
        return [p for p in (src / "1").glob("model.*")] if (src / "1").is_dir() else []

    if not model_files():
        subprocess.run([sys.executable, str(ROOT / "model_repo" / "generate.py"), "--models", name], check=True)
    dst = repo / (as_name or name)
    (dst / "1").mkdir(parents=True, exist_ok=True)
    for f in model_files():
        shutil.copy(f, dst / "1" / f.name)
    text = (src / "config.pbtxt").read_text()
    if as_name:
        text = text.replace(f'name: "{name}"', f'name: "{as_name}"')
    (dst / "config.pbtxt").write_text(text)


def write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


def echo_slow(path: Path, matmuls: int = 100, width: int = 1024) -> Path:
    """FP32 INPUT [batch, -1] and WORK [batch, width] -> OUTPUT == INPUT, after `matmuls` MatMuls on WORK.

    OUTPUT = INPUT + 0 * sum(chain(WORK)): every reply is exactly its own input (so mixed-up rows
    show), and each execution takes a while (so requests queue up and batch).
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    x = helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", "n"])
    work = helper.make_tensor_value_info("WORK", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", "n"])
    nodes, prev = [], "WORK"
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{i}"]))
        prev = f"h{i}"
    nodes += [
        helper.make_node("ReduceSum", [prev, "axes"], ["s"], keepdims=1),  # [batch, 1]
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["INPUT", "z"], ["OUTPUT"]),  # broadcast [batch, n] + [batch, 1]
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")]
    return save(_model(nodes, "echo_slow", [x, work], [y], inits), path)


ECHO_WIDTH = 1024


def simple_sequence(path: Path) -> Path:
    """Triton's example `simple_sequence` as ONNX: INT32 INPUT, START and READY [batch, 1] ->
    OUTPUT = (INPUT + START) * READY (tritonclient's sequence examples expect exactly this)."""
    io = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 1]) for n in ("INPUT", "START", "READY")]
    y = helper.make_tensor_value_info("OUTPUT", TensorProto.INT32, ["batch", 1])
    nodes = [helper.make_node("Add", ["INPUT", "START"], ["s"]), helper.make_node("Mul", ["s", "READY"], ["OUTPUT"])]
    return save(_model(nodes, "simple_sequence", io, [y]), path)


def accumulator(path: Path, dtype: int = TensorProto.INT32) -> Path:
    """An implicit-state model: INPUT and STATE_IN [batch, 1] -> OUTPUT = STATE_OUT = STATE_IN + INPUT
    (a running sum per sequence, carried by the server), plus CORRID [batch, 1] (uint64) echoed as
    ID and END (bool) as ENDED."""
    x = helper.make_tensor_value_info("INPUT", dtype, ["batch", 1])
    s = helper.make_tensor_value_info("STATE_IN", dtype, ["batch", 1])
    cid = helper.make_tensor_value_info("CORRID", TensorProto.UINT64, ["batch", 1])
    end = helper.make_tensor_value_info("END", TensorProto.BOOL, ["batch", 1])
    outs = [helper.make_tensor_value_info("OUTPUT", dtype, ["batch", 1]),
            helper.make_tensor_value_info("STATE_OUT", dtype, ["batch", 1]),
            helper.make_tensor_value_info("ID", TensorProto.UINT64, ["batch", 1]),
            helper.make_tensor_value_info("ENDED", TensorProto.BOOL, ["batch", 1])]
    nodes = [helper.make_node("Add", ["STATE_IN", "INPUT"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
             helper.make_node("Identity", ["CORRID"], ["ID"]),
             helper.make_node("Identity", ["END"], ["ENDED"])]
    return save(_model(nodes, "accumulator", [x, s, cid, end], outs), path)
