"""Speed and memory: per-block compile, CUDA graphs, fp8 and NF4 bases, fused q/k/v, fused LoRA-up, attention op."""
