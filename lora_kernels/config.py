"""LoRAConfig: the options of a LoRA layer, checked once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    """r: rank (int >= 1); lora_alpha: the scaling's numerator; lora_dropout: dropout probability
    on the LoRA branch's input, in [0, 1); use_rslora: scaling = lora_alpha / √r instead of / r;
    fan_in_fan_out: the base weight is stored [in, out] (GPT-2's Conv1D); merge_weights: merge in
    eval(), unmerge in train() (loralib's behaviour); use_dora: DoRA (weight-decomposed LoRA, PEFT's use_dora), a
    trained magnitude per output row rescaling W0 + s·BA to unit-norm rows."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    merge_weights: bool = False
    use_dora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for flag in ("use_rslora", "fan_in_fan_out", "merge_weights", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / √r with rsLoRA."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def replace(self, **changes) -> "LoRAConfig":
        """A copy with some options changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, config: "LoRAConfig | None", options: dict) -> "LoRAConfig":
        """`config`, or a config built from keyword options; not both."""
        if config is None:
            return cls(**options)
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        if options:
            raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
        return config
