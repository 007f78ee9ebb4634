"""Data, embedded tasks and rewards: dataset loading and prompts, the synthetic tasks the package generates itself,
and the verifiable reward."""
