"""Custom ops (torch.library) of lora_kernels: one module per op family."""
