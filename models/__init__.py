"""Networks and differentiable image transformations."""
