"""Fused low-rank (LoRA) matmul: `lora_matmul`, `lora_linear`, `lora_matmul_reference`."""
from jaxft_kernels.lora_matmul.ops import (lora_linear, lora_matmul, lora_matmul_reference,
                                           lora_matmul_sharded, matmul2)

__all__ = ["lora_linear", "lora_matmul", "lora_matmul_reference", "lora_matmul_sharded", "matmul2"]
