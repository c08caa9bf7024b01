"""Architectures of public models as `model.*` fields, for configs that need no weights.

The planner (`jaxft compile`) compiles these shapes without any checkpoint; with
`model.pretrained` set instead, it reads only the checkpoint's metadata.
tests/test_compile.py checks SMOLLM2_135M and GEMMA3_270M against the GGUF metadata.
"""

# SmolLM2-135M (Llama layout): HF config of HuggingFaceTB/SmolLM2-135M.
SMOLLM2_135M = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, d_ff=1536, rope_base=100000.0, norm_eps=1e-5, max_len=8192,
                    tie_embeddings=True)

# Gemma-3-270M: 5 sliding-window (512) layers per global one, GeGLU, q/k norms, post norms.
GEMMA3_270M = dict(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
                   head_dim=256, d_ff=2048, norm_eps=1e-6, rope_base=1e6, rope_base_local=1e4,
                   sliding_window=512, global_every=6, mlp="geglu", post_norms=True,
                   qk_norm=True, embed_scale=True, query_scale=256 ** -0.5, max_len=32768,
                   tie_embeddings=True)

# Llama-3-8B: GQA 32/8 heads, vocab 128256, untied head.
LLAMA3_8B = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 head_dim=128, d_ff=14336, rope_base=500000.0, norm_eps=1e-5, max_len=8192,
                 tie_embeddings=False)

# Llama-2-70B: the model of MaxText's published 70B MFU figures.
LLAMA2_70B = dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                  head_dim=128, d_ff=28672, rope_base=10000.0, norm_eps=1e-5, max_len=4096,
                  tie_embeddings=False)
