"""Linearizing pretrained softmax-attention LMs (LoLCATs): conversion, attention transfer, LoRA."""
