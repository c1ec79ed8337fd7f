"""longvila-jax."""
