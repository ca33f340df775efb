"""flux_lora: a torchrun-native trainer for FLUX.1 LoRA adapters.

Two stages share nothing but a cache directory:
    python -m flux_lora preprocess --model M --data IMAGES --cache-dir CACHE
    python -m flux_lora train --model M --cache-dir CACHE --output OUT
"""

__version__ = "0.1.0"
