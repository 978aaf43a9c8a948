"""moejax: serve Mixture-of-Experts models sharded over a JAX device mesh, and find the layout that serves them best."""

from moejax.config import ModelConfig, load_model_config
from moejax.inference import Model, load
from moejax.mesh import Layout, make_mesh

__all__ = ["Layout", "Model", "ModelConfig", "load", "load_model_config", "make_mesh"]
