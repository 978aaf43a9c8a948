"""The MoE transformer (Flax NNX) and its sharded step functions.

Dimension alphabet, used in einsum strings, activation names (`x_BTD`) and sharding specs:

    B batch        T tokens (query)     S cache positions    D model width
    N query heads  K kv heads           G queries per kv head H head dim
    F FFN width    E experts            X experts per token   V vocab
    L layers       P pages              M flattened tokens (B*T)

Weights are stored with a leading layer axis `L` padded to `stage * ceil(L / stage)` so the stage
axis splits it evenly; padding layers have all-zero weights, which makes each one an exact
identity (its attention and MoE outputs are zero and the residual stream passes through).

Module code runs on local shards inside one `jax.shard_map` over the whole mesh and names logical
dims only; `moejax.sharding` maps them to mesh axes, including for the collectives.
"""

from moejax.model.transformer import Transformer

__all__ = ["Transformer"]
