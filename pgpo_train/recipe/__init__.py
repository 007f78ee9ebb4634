"""The recipe: the training loop that calls the library's phases in order, and `pgpo-train inspect`."""
