"""moejax: serve Mixture-of-Experts models sharded over a JAX device mesh, and find the layout that serves them best."""

from moejax.config import ModelConfig, load_model_config
from moejax.devices import cpu_devices
from moejax.engine import Engine, RequestOutput, SamplingParams, ServeConfig
from moejax.inference import Model, load
from moejax.mesh import Layout, make_mesh

__all__ = ["Engine", "Layout", "Model", "ModelConfig", "RequestOutput", "SamplingParams", "ServeConfig",
           "cpu_devices", "load", "load_model_config", "make_mesh"]
