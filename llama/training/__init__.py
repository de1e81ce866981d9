"""Config, data, fp16 loss scaling, offload, the loop, resume, run log and folder."""
