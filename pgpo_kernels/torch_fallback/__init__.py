"""Torch fallbacks of the kernels, one module per Triton module (token_kl, token_stats, fused_linear, fused_logp,
reshape): same results, chunked over rows, for CPUs and wherever Triton cannot run. common.py holds what they share,
compile.py their optional torch.compile.
"""
