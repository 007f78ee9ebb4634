"""The RL math as pure torch functions: advantages, PGPO token weights and their variants, policy losses, and the
non-finite guards."""
