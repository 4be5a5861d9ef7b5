"""Benchmarks for lora_jax: ``python -m bench --quick`` writes JSON and markdown to bench/results/."""
