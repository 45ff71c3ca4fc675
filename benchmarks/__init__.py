"""lora_kernels benchmark suite: `python -m benchmarks --help` (or ./run.sh bench)."""
