"""The engine: requests, scheduling, the denoising step and its sampler; tokens in, events out."""
