"""Decode steps with fixed shapes, so that a GPU can replay each one as a CUDA graph.

A decode step of the eager path attends over a cache slice that grows by one every step and reads
its position as a Python int: new shapes, host values, nothing a graph can hold. Here the KV cache
is the model's whole max_seq_len for a batch size, made once and kept; the position is a device
tensor; the new keys and values go in with index_copy_; a mask hides the positions not yet
written (llama/model/transformer.py does all three when start_pos is a tensor). One step per batch size is
captured after warm-up (torch.cuda.CUDAGraph) and replayed; on a CPU the same step runs without
capture. Prefill (any length, with the soft prompt) stays eager, writing into the same cache.
"""
import torch

WARMUP_RUNS = 2  # before capture: lets lazy initialisation (cuBLAS handles, workspaces) happen


class StaticDecoder:
    """One stage's decode step: token ids (first stage) or h (B, 1, dim) in; logits of the last
    position (last stage) or h out. The output tensor is reused: consume it before the next step."""

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)
        self.capture = self.device.type == "cuda"
        self.caches = {}  # batch size -> [KVCache per block]
        self.steps = {}  # (batch size, variant) -> _Step

    def start(self, batch_size: int):
        """Give the model's blocks this batch size's cache (zeroed): max_seq_len positions."""
        if batch_size not in self.caches:
            self.model.setup_kv_cache(batch_size, self.model.args.max_seq_len)
            self.caches[batch_size] = [b.attention.cache for b in self.model.layers.values()]
        for block, cache in zip(self.model.layers.values(), self.caches[batch_size]):
            # Positions past the one being written are masked, but 0 x inf would still be NaN.
            cache.keys.zero_()
            cache.values.zero_()
            block.attention.cache = cache

    def step(self, x, start_pos: int, variant=None):
        """Run one position (x: (B, 1) ids or (B, 1, dim) hidden states) at cache start_pos.

        variant names what else the step depends on (a tuning method switched on or off): a
        captured graph replays what it recorded, so each variant gets its own."""
        key = (x.shape[0], variant)
        if key not in self.steps:
            self.steps[key] = _Step(self._compute, x, self.device, self.capture)
        return self.steps[key](x, start_pos)

    def _compute(self, x, position):
        model = self.model
        h = model.embed(x) if model.has_embeddings else x
        h = model.run_layers(h, position)
        return model.logits(h[:, -1]) if model.has_head else h


class _Step:
    """Static input buffers for one batch size, and the graph that reads them once captured."""

    def __init__(self, compute, example, device, capture: bool):
        self.compute, self.device, self.capture = compute, device, capture
        self.input = torch.zeros(example.shape, dtype=example.dtype, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.output = None, None

    def __call__(self, x, start_pos: int):
        self.input.copy_(x)
        self.position.fill_(start_pos)
        if not self.capture:
            return self.compute(self.input, self.position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output

    def _capture(self):
        # Warm-up and capture run on the real input and position: they write the same keys and
        # values into the cache that the replay then writes again, so nothing is disturbed.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.compute(self.input, self.position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.compute(self.input, self.position)
