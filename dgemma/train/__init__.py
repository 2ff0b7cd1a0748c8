"""Block-diffusion training (REFERENCE.md §9): objective.py (corruption + loss), data.py (JSONL), lora.py
(adapters, merge, files), trainer.py (the loop, checkpoints, resume). CLI: `dgemma train`, `dgemma merge-lora`."""

from dgemma.train.trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
