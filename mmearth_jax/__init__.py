"""mmearth_jax: pretraining geospatial foundation models in JAX, from one CPU to a TPU pod."""
__version__ = "0.1.0"
