"""Tensor parallelism as a transform of a plain model (docs/tensor_parallel.md): the rank's
place in its group (`TensorParallel`), which slice of each checkpoint tensor a rank holds
(`ShardPlan`), and the module swap done on the meta-device model before weights load
(`shard_model`). Models know nothing of it."""
