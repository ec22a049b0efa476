"""service.core: spec, discovery, registry, data plane, batching, tensors, tasks, runtime."""
