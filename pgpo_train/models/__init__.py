"""Vision-language models: what PGPO needs to know per family (placeholders, positions, the text-only pass), the
fused lm head, processors, the policy, and the tiny models built locally for the default run and the tests."""
