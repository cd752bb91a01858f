"""Training-side code: simulations that make training data and mocks, the training loop, evaluation."""
