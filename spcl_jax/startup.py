"""The start-up sequence of every command that runs on data (training, evaluating a checkpoint, the dry run): the
method resolved once, the data loaded, the config fitted to it and the sizes checked against it."""
from spcl_jax import config_validation, data
from spcl_jax import method as methods


def prepare(config, device_count, pretrain=True, check_step=None):
    """(config fitted to the data, method, splits).

    pretrain: also check the pretrain split's size against the config (training and the dry run do).
    check_step(config, method): a check of the training step to run before the data is loaded, or, when
    `infer_from_data` lets the data still change the config, once the config was fitted to it.
    """
    method = methods.resolve(config)
    if check_step and not config.infer_from_data:
        check_step(config, method)
    splits = data.load_splits(config)
    config = config_validation.fit_to_data(config, splits, device_count)
    if pretrain:
        config_validation.check_pretrain_size(config, len(splits.pretrain))
    config_validation.check_eval_size(config, len(splits.train), device_count)
    if check_step and config.infer_from_data:
        check_step(config, method)
    return config, method, splits
