"""Training: the state pytree, the pure step, evaluation, and the loop that drives them."""
