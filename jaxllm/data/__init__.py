"""Input pipelines: TFDS builders (array_record, no TensorFlow), tokenizers, packing."""

from jaxllm.data.pipeline import DataStateError, PackedBatches, TokenIdError, check_token_ids, pack_row
from jaxllm.data.sources import DatasetError, load_source
from jaxllm.data.tokenizers import ByteTokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataStateError",
    "DatasetError",
    "PackedBatches",
    "TokenIdError",
    "check_token_ids",
    "load_source",
    "make_tokenizer",
    "pack_row",
]
