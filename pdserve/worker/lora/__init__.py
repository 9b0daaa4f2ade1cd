"""LoRA adapters: loading PEFT checkpoints (adapter.py), device slots (lora_weights.py), the
per-batch segmented application (lora_batch.py) and the adapter registry (lora_manager.py)."""
