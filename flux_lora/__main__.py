"""Entry point for `python -m flux_lora ...` and `torchrun --nproc_per_node=N -m flux_lora ...`."""

from flux_lora.cli import main

if __name__ == "__main__":
    main()
