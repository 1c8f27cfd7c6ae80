"""Which parameters LARS leaves alone: every bias and every normalisation parameter (DIFFERENCES.md, B-5 and LARS)."""
import re
from collections.abc import Hashable

import jax

# Attribute names of normalisation modules: bn1, stem_bn, downsample_bn, proj_bn2, layer_norm, ...
_NORM_NAME = re.compile(r"(?:^|_)(?:bn|norm)\d*$")


def key_name(key: Hashable) -> Hashable:
    """A plain str/int from an nnx path entry or a jax key-path entry (DictKey, GetAttrKey, SequenceKey)."""
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    return key


def is_norm_or_bias(path: tuple[Hashable, ...]) -> bool:
    """True for a bias or any parameter of a normalisation module.

    `path` is a tuple of keys, either from `nnx.to_flat_state(state)` (e.g. `('layer1', 0, 'bn1', 'scale')`) or a
    jax key path from `jax.tree_util.tree_map_with_path` over an nnx State, which ends in `GetAttrKey('value')`.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    names = [key_name(key) for key in path]
    if not names:
        return False
    if names[-1] == "bias":
        return True
    return any(isinstance(name, str) and _NORM_NAME.search(name) for name in names[:-1])
