"""The recipes shipped with mmearth_jax: `configs/<name>.py` in the repository, installed as
`mmearth_jax.configs.<name>`, so `--config <name>:<variant>` finds them from any folder."""
