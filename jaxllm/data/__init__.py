"""Input pipelines: TFDS builders, tokenizers, packing."""
