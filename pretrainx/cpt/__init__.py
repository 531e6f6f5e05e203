"""Continual pretraining's transforms of a trained model's params: LoRA and freezing (peft),
depth growth (growth), softmax -> linear attention conversion (linearize); and where a run's
starting point comes from (sources)."""
