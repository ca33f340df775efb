"""An exponential moving average of the LoRA weights (train.ema_decay; kohya/SimpleTuner's EMA):
after every applied update, ema ← ema + (1 − decay)·(w − ema). A skipped update (non-finite
loss) leaves it alone, decided on the device like the update itself. It lives beside the
parameters (sharded with them under FSDP2), is saved in every checkpoint and written at the end
as OUTPUT/lora-ema.safetensors, a LoRA file like lora.safetensors."""

from __future__ import annotations

import contextlib

import torch


class Ema:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | bool = False) -> None:
        """Move toward the current weights; `skipped` (a device flag) makes the step a no-op."""
        weight = (1.0 - self.decay) * (1.0 - torch.as_tensor(skipped, dtype=torch.float32, device=self.shadow[0].device))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    def state(self) -> dict[str, torch.Tensor]:
        """name -> tensor (each rank's shard under FSDP2), for checkpoints."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        from flux_lora.parallel.fsdp import fill

        missing = [n for n in self.names if n not in state]
        if missing:
            from flux_lora.errors import ConfigError

            raise ConfigError(f"the checkpoint has no EMA of {missing[0]} (+{len(missing) - 1} more); "
                              "it was written with another train.ema_decay setting")
        for name, shadow in zip(self.names, self.shadow):
            fill(shadow, state[name])

    @contextlib.contextmanager
    def applied(self):
        """The model's LoRA holds the EMA weights inside (to export them), its own weights after."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):  # one by one: DTensors have no foreach copy
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)
