"""pgpo_train: a lean PGPO training loop on transformers' Qwen2.5-VL."""
