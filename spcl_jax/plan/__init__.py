"""Planning a run for hardware that is not attached: compile every program of a run for a TPU slice or GPU
hosts from a CPU machine, and read what each needs (`python -m spcl_jax.plan`, README "Plan before you pay")."""
