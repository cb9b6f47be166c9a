"""Fused kernels (`kernels/`) on the PyTorch backend's serving path, switched on per model.

    parameters { key: "fuserve_kernels" value: { string_value: "bert_encoder" } }
        The model is a BERT-family sentence encoder (all-MiniLM-L6-v2 and kin) whose forward takes
        (input_ids, attention_mask[, token_type_ids]) and returns the mean-pooled, L2-normalised
        embedding. fuserve runs its own forward with the model's weights (found in its state_dict
        by the Hugging Face names, e.g. `...embeddings.word_embeddings.weight`,
        `...encoder.layer.N.attention.self.query.weight`): embed_layernorm, attention with
        masked_softmax, add_layernorm, bias_gelu, and mean_pool_l2norm at the end. Optional:
        `fuserve_bert_heads` (default 12, MiniLM: 12), `fuserve_bert_eps` (default 1e-12).

    parameters { key: "fuserve_kernels" value: { string_value: "preprocess_image" } }
        The model's first input arrives as uint8 images [N, H, W, 3] (declare it TYPE_UINT8 with
        dims [H, W, 3]); preprocess_image turns it into normalised float NCHW before the model sees
        it. Optional: `fuserve_image_mean` and `fuserve_image_std` ("r,g,b"; ImageNet's by
        default), `fuserve_image_bgr` ("true" for BGR input), `fuserve_image_dtype`
        (fp32 | fp16 | bf16, what the model takes; default fp32).

The kernels run compiled on CUDA; elsewhere each falls back to its torch reference (the same
maths), so the same model answers the same on CPU. Both names may be combined, comma-separated,
though no model here needs that.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidArgument, ModelLoadError
from ..model_config import ModelConfig, mc

KNOWN = ("bert_encoder", "preprocess_image")


def _param(config: ModelConfig, key: str, default: str = "") -> str:
    return config.parameters[key].string_value if key in config.parameters else default


def wrap_with_kernels(module: Any, config: ModelConfig, device: Any, where: str) -> Any:
    names = [n.strip() for n in _param(config, "fuserve_kernels").split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ModelLoadError(f"{where}: unknown fuserve_kernels {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    if "bert_encoder" in names:
        module = BertEncoder(module, config, device, where)
    if "preprocess_image" in names:
        module = ImagePreprocess(module, config, where)
    return module


def _floats(text: str, n: int, key: str, where: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ModelLoadError(f"{where}: {key} must be {n} comma-separated numbers, got '{text}'")
    return values


class ImagePreprocess:
    """uint8 NHWC in, the model's float NCHW through kernels.preprocess_image, then the model."""

    def __init__(self, module: Any, config: ModelConfig, where: str) -> None:
        import torch

        self.module = module
        self.mean = _floats(_param(config, "fuserve_image_mean", "0.485,0.456,0.406"), 3, "fuserve_image_mean", where)
        self.std = _floats(_param(config, "fuserve_image_std", "0.229,0.224,0.225"), 3, "fuserve_image_std", where)
        if any(s <= 0 for s in self.std):
            raise ModelLoadError(f"{where}: fuserve_image_std must be positive")
        self.bgr = _param(config, "fuserve_image_bgr").lower() in ("1", "true", "yes")
        dtype = _param(config, "fuserve_image_dtype", "fp32").lower()
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise ModelLoadError(f"{where}: fuserve_image_dtype must be fp32, fp16 or bf16, got '{dtype}'")
        self.dtype = dtypes[dtype]
        first = config.input[0] if config.input else None
        if first is None or first.data_type != mc.DataType.Value("TYPE_UINT8") or list(first.dims)[-1:] != [3]:
            raise ModelLoadError(f"{where}: with preprocess_image the first input must be TYPE_UINT8 [H, W, 3]")

    def __call__(self, images: Any, *rest: Any) -> Any:
        from kernels import preprocess_image

        x = preprocess_image(images, self.mean, self.std, out_dtype=self.dtype, bgr_to_rgb=self.bgr)
        return self.module(x, *rest)


class BertEncoder:
    """A BERT-family encoder + mean pooling + L2 normalisation on the fused kernels."""

    def __init__(self, module: Any, config: ModelConfig, device: Any, where: str) -> None:
        state = {k: v.detach().to(device) for k, v in module.state_dict().items()}

        def find(suffix: str) -> Any:
            hits = [v for k, v in state.items() if k.endswith(suffix)]
            if len(hits) != 1:
                raise ModelLoadError(f"{where}: bert_encoder needs exactly one weight named '*{suffix}' in the "
                                     f"model's state_dict, found {len(hits)}")
            return hits[0]

        self.word = find("embeddings.word_embeddings.weight")
        self.position = find("embeddings.position_embeddings.weight")
        self.token_type = find("embeddings.token_type_embeddings.weight")
        self.emb_ln = (find("embeddings.LayerNorm.weight"), find("embeddings.LayerNorm.bias"))
        n_layers = 0
        while any(k for k in state if f"encoder.layer.{n_layers}." in k):
            n_layers += 1
        if n_layers == 0:
            raise ModelLoadError(f"{where}: bert_encoder found no 'encoder.layer.N.' weights in the model")
        self.layers = []
        for i in range(n_layers):
            p = f"encoder.layer.{i}."

            def w(name: str, p: str = p) -> Any:
                return find(p + name)

            self.layers.append({
                "q": (w("attention.self.query.weight"), w("attention.self.query.bias")),
                "k": (w("attention.self.key.weight"), w("attention.self.key.bias")),
                "v": (w("attention.self.value.weight"), w("attention.self.value.bias")),
                "o": (w("attention.output.dense.weight"), w("attention.output.dense.bias")),
                "ln1": (w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias")),
                "i": (w("intermediate.dense.weight"), w("intermediate.dense.bias")),
                "out": (w("output.dense.weight"), w("output.dense.bias")),
                "ln2": (w("output.LayerNorm.weight"), w("output.LayerNorm.bias")),
            })
        self.input_names = [t.name for t in config.input]
        if len(self.input_names) not in (2, 3):
            raise ModelLoadError(f"{where}: bert_encoder takes input_ids, attention_mask and optionally "
                                 f"token_type_ids; the config declares {len(self.input_names)} inputs")
        self.hidden = self.word.shape[1]
        try:
            self.heads = int(_param(config, "fuserve_bert_heads", "12"))
            self.eps = float(_param(config, "fuserve_bert_eps", "1e-12"))
        except ValueError as exc:
            raise ModelLoadError(f"{where}: bad fuserve_bert_heads / fuserve_bert_eps: {exc}") from None
        if self.heads <= 0 or self.hidden % self.heads:
            raise ModelLoadError(f"{where}: hidden size {self.hidden} does not split into {self.heads} heads")

    def check_inputs(self, feeds: dict[str, Any]) -> None:
        """Per request, before batching: token ids inside the tables, so a bad request fails alone."""
        names = self.input_names
        limits = [(names[0], self.word.shape[0])] + ([(names[2], self.token_type.shape[0])] if len(names) > 2 else [])
        for name, limit in limits:
            ids = feeds[name]
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise InvalidArgument(f"input '{name}' must hold ids in [0, {limit}), got values in "
                                      f"[{int(ids.min())}, {int(ids.max())}]")
        seq = feeds[names[0]].shape[-1]
        if seq > self.position.shape[0]:
            raise InvalidArgument(f"input '{names[0]}' has {seq} tokens; the model has {self.position.shape[0]} "
                                  f"positions")

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        import torch
        from torch.nn.functional import linear

        from kernels import add_layernorm, bias_gelu, embed_layernorm, masked_softmax, mean_pool_l2norm

        B, S = input_ids.shape
        H, nh = self.hidden, self.heads
        d = H // nh
        x = embed_layernorm(input_ids, token_type_ids, self.word, self.position, self.token_type, *self.emb_ln,
                            self.eps)
        scale = 1.0 / math.sqrt(d)
        for layer in self.layers:
            q, k, v = (linear(x, *layer[n]).view(B, S, nh, d).transpose(1, 2) for n in ("q", "k", "v"))
            probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, attention_mask)
            context = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, H)
            x = add_layernorm(linear(context, *layer["o"]), x, *layer["ln1"], self.eps)
            inner = bias_gelu(linear(x, layer["i"][0]), layer["i"][1])
            x = add_layernorm(linear(inner, *layer["out"]), x, *layer["ln2"], self.eps)
        return mean_pool_l2norm(x, attention_mask)
