"""Fine-tuning: the block-diffusion objective, the AR baseline, LoRA and data parallelism."""
