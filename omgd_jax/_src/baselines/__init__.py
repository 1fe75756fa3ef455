"""The comparison methods' implementations (their public face: `omgd_jax.baselines`)."""
