"""The MoE transformer (Flax NNX) and its sharded step functions.

Arrays carry their dims as a name suffix (`x_BTD`), in the one dimension alphabet of docs/design.md
("Dimension alphabet": B batch, T query tokens, C cached positions, S stages, A routed pairs, J expert shards, ...).

Weights are stored with a leading layer axis `L` padded to `stage * ceil(L / stage)` so the stage
axis splits it evenly; padding layers have all-zero weights, which makes each one an exact
identity (its attention and MoE outputs are zero and the residual stream passes through).

Module code runs on local shards inside one `jax.shard_map` over the whole mesh and names logical
dims only; the model's `moejax.sharding.Parallelism` maps them to mesh axes, including for the collectives.
"""

from moejax.model.transformer import Transformer

__all__ = ["Transformer"]
