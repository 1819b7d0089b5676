"""One module per model, each defining ``SPEC`` (a :class:`harness.spec.ModelSpec`); found by listing."""
