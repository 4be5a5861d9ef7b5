"""Reference model architectures (Flax linen) whose module paths mirror Hugging Face."""
