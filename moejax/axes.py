"""The mesh axes, named once: `data`, `tensor`, `expert`, `stage` (the order of `moejax.mesh.Layout`'s factors),
and the names of the expert axis's two modes (`moejax.sharding`).

A module of its own (no JAX) so that the mesh (`moejax.mesh`), the multi-host runtime that lays the mesh over
hosts (`moejax.distributed`) and the command lines read the names from below them.
"""

AXES = ("data", "tensor", "expert", "stage")

# What the expert axis does outside the MoE blocks: attention data-parallel over it, or replicated over it.
EXPERT_MODES = ("dp_attention", "replicated_attention")
DEPRECATED_EXPERT_MODES = {"data": "dp_attention", "replicated": "replicated_attention"}  # for one release
