"""The model: config, network, KV cache, checkpoint format, FP8 weights, device and dtype."""
