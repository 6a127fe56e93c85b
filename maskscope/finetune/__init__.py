"""LoRA fine-tuning (peft) and the data builders that make model organisms with known answers."""

from maskscope.finetune.train import Child, FinetuneSpec, finetune

__all__ = ["Child", "FinetuneSpec", "finetune"]
