"""Run plumbing: configuration and its checks, checkpoints (single-process and sharded), torchrun/FSDP2, the run
directory, graceful stop, metrics logging and plots."""
