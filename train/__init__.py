"""Training side: MNIST data and the training loop."""
