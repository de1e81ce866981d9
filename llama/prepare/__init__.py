"""A stage made ready to run: join the job, load this rank's layers, then apply the run's
transforms in one declared order (quantize, fuse, method, recompute/offload, compile)."""
