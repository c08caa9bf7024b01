"""Pallas kernels, one folder per op (kernel + public op with `interpret=` + `<op>_reference`).

This top-level folder installs as `jaxft_kernels` (the name `kernels` belongs to an
unrelated PyPI package). The ops arrive with the kernels issue.
"""
