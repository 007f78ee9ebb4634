"""The phases of one RL step: batching, rollouts and refill, the scoring passes, and the gradient updates."""
