"""Inference: load models, predict, ASE calculator."""

from jmp_jax.inference.api import JMPModel, load

__all__ = ["JMPModel", "load"]
