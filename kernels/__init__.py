"""Fused kernels in OpenAI Triton for the serving path, one op per module.

Each module has the Triton kernel, a torch `reference` (the same maths in fp32; also what runs when
there is no GPU or no triton) and a launcher that checks shapes and dtypes and picks between them
(`_launch.use_triton`). All compute in fp32 and take and give float32, float16 or bfloat16.

    preprocess_image   uint8 NHWC images -> normalised float NCHW (ToTensor + Normalize, BGR, crop)
    embed_layernorm    word + position + token-type embeddings -> LayerNorm
    add_layernorm      residual add -> LayerNorm
    bias_gelu          bias add -> GELU (erf)
    masked_softmax     softmax over keys with a key mask; fully masked rows give zeros
    mean_pool_l2norm   masked mean pooling -> L2 normalisation (sentence-transformers' tail)

`triton` and `torch` are imported only by these modules: the server never needs them for models
that do not use kernels.
"""

from .add_layernorm import add_layernorm
from .bias_gelu import bias_gelu
from .embed_layernorm import embed_layernorm
from .masked_softmax import masked_softmax
from .mean_pool_l2norm import mean_pool_l2norm
from .preprocess_image import preprocess_image

__all__ = ["add_layernorm", "bias_gelu", "embed_layernorm", "masked_softmax", "mean_pool_l2norm", "preprocess_image"]
