"""The mesh axes, named once: `data`, `tensor`, `expert`, `stage` (the order of `moejax.mesh.Layout`'s factors),
and the names of the expert axis's two modes (`moejax.sharding`).

A module of its own (no JAX) so that the mesh (`moejax.mesh`), the multi-host runtime that lays the mesh over
hosts (`moejax.distributed`) and the command lines read the names from below them.
"""

AXES = ("data", "tensor", "expert", "stage")

# A layout whose MoE splits a group's devices apart from attention (`TP4MTP1EP8`, `moejax.mesh.Layout.split`) factors
# the group into four mesh axes, each splitting one attention dim and one MoE dim:
#   tensor         attention heads   x  each expert's FFN width   (the runtime's tensor axis)
#   tensor_expert  attention heads   x  the experts               (attention TP that becomes expert parallelism)
#   data_tensor    attention requests x each expert's FFN width   (attention DP that becomes MoE tensor parallelism)
#   expert         attention requests x the experts               (the runtime's expert axis, dp_attention mode)
SPLIT_AXES = ("tensor_expert", "data_tensor")
# Mesh axis order, outermost first: `tensor` fastest, so attention's tensor group (tensor x tensor_expert) is
# neighbouring devices (one NVLink domain on GPUs), then the rest of the MoE group, stage, data.
MESH_ORDER = ("data", "stage", "expert", "data_tensor", "tensor_expert", "tensor")

# What the expert axis does outside the MoE blocks: attention data-parallel over it, or replicated over it.
EXPERT_MODES = ("dp_attention", "replicated_attention")
DEPRECATED_EXPERT_MODES = {"data": "dp_attention", "replicated": "replicated_attention"}  # for one release
