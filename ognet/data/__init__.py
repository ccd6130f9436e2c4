"""The data path: point files -> layouts -> shards -> sampler -> transforms -> tensors."""
