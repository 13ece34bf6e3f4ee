"""vlopt's built-in passes. Each module is one pass — a typed config, one `apply` and its own
`register_passes` hook — and has its own line in the `vlopt` entry-point group (pyproject.toml),
exactly as a third-party plugin has. Modules starting with `_` are helpers the passes import when
they run; nothing here imports torch at registration."""
