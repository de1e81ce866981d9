"""Decode steps with fixed shapes, so that a GPU can replay each one as a CUDA graph.

The generation engine (llama/serving/engine.py) decodes every row of a batch at its own position
over a KV cache of fixed size: positions are a device tensor, new keys and values go in with an
indexed copy, a per-row mask hides what a row has not written (llama/model/transformer.py does
all three when start_pos is a tensor). Nothing in such a step has a host value or a new shape,
so one step per batch size (and set of adapters in use) is captured after warm-up
(torch.cuda.CUDAGraph) and replayed; on a CPU the same step runs without capture.
"""
import torch

WARMUP_RUNS = 2  # before capture: lets lazy initialisation (cuBLAS handles, workspaces) happen


class StepGraphs:
    """compute(x, positions) -> out, run through a static copy of its inputs; captured and
    replayed per key on a GPU. The output tensor is reused: consume it before the next step."""

    def __init__(self, compute, device):
        self.compute, self.device = compute, torch.device(device)
        self.capture = self.device.type == "cuda"
        self.steps = {}  # key (batch size, what else the step depends on) -> _Step

    def __call__(self, key, x, positions):
        """key names everything the step depends on besides x and positions (its batch size,
        which adapters are on): a captured graph replays exactly what it recorded."""
        if key not in self.steps:
            self.steps[key] = _Step(self.compute, x, positions, self.device, self.capture)
        return self.steps[key](x, positions)


class _Step:
    """Static input buffers for one key, and the graph that reads them once captured."""

    def __init__(self, compute, x, positions, device, capture: bool):
        self.compute, self.device, self.capture = compute, device, capture
        self.input = torch.zeros(x.shape, dtype=x.dtype, device=device)
        self.positions = torch.zeros(positions.shape, dtype=torch.long, device=device)
        self.graph, self.output = None, None

    def __call__(self, x, positions):
        self.input.copy_(x)
        self.positions.copy_(positions)
        if not self.capture:
            return self.compute(self.input, self.positions)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output

    def _capture(self):
        # Warm-up and capture run on the real input and positions: they write the same keys and
        # values into the cache that the replay then writes again, so nothing is disturbed.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.compute(self.input, self.positions)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.compute(self.input, self.positions)
