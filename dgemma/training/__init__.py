"""Fine-tuning: the block-diffusion objective, the AR baseline, LoRA, and training over several processes (data
parallel or FSDP2-sharded) with resumable distributed checkpoints."""
