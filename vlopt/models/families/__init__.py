"""vlopt's own model families, one module each, registered through the `vlopt` entry-point group
like a plugin's. Each declares its family as data; the model itself lives in `vlopt.models.<name>`."""
