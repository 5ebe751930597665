"""Expert worker: a gRPC server holding a shard of routed experts, run inside a Ray actor."""
