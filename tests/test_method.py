"""spcl_jax.method: the original's method flags resolve to one method description."""
import pytest

from configs import default
from spcl_jax import config_validation


@pytest.mark.parametrize("flags,method", [
    ((None, None, None), "spcl"), ((True, True, None), "spcl"), ((True, False, None), "cluster"),
    ((False, True, None), "metric"), ((False, False, None), "simclr"), ((True, True, True), "supervised"),
])
def test_original_method_flags_map_onto_method(flags, method):
    config = default.get_config()
    config.clustering_use, config.metric_learn, config.supervised = flags
    assert config_validation.method_of(config).name == method
