"""pgpo-bench: microbenchmarks of pgpo_kernels against torch eager, torch.compile and Liger."""
