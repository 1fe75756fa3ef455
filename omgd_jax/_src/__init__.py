"""omgd_jax's implementation. Private: import the public names from `omgd_jax`."""
