"""How one decoding step runs: eager, torch.compile'd, or replayed as a CUDA graph.

stage_stack.generation owns *what* is decoded (layout, CFG, sampling); this module owns how a
single step of the LM runs on the machine. All three ways call the same `StageLM.forward` with
a static KV cache (stage_lm.KVCache, `static=True`): the step's inputs are copied into
preallocated buffers (tokens [B, K, 1], positions [B, 1]); the cache's write slot is a tensor;
the attention mask is the whole call's mask. So every step has the same shapes, strides and
addresses, which is what a compiled graph needs to run without recompiling and what a CUDA
graph needs to be replayed.

    mode "eager"       the forward as is
    mode "compile"     torch.compile(dynamic=False): one graph per (model, batch, length) shape,
                       reused by every step; no C++ compiler / no backend -> eager + one warning
    mode "cuda-graph"  (CUDA only) the step captured once after a warm-up, replayed per step
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .models.stage_lm import KVCache, StageLM

StepMode = Literal["eager", "compile", "cuda-graph"]
STEP_MODES = ("eager", "compile", "cuda-graph")


def _step(lm: StageLM, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
          mask: torch.Tensor) -> torch.Tensor:
    """The last-step logits [B, K, card] (float32) of feeding one column at `cache.step`."""
    return lm(tokens, mask, cache=cache, positions=positions, last_only=True)[:, :, -1].float()


_compiled_step = None
_compile_failed: str | None = None


def _compiled():
    global _compiled_step
    if _compiled_step is None:
        # One compiled function for the process: dynamo keys its graphs on the inputs' shapes,
        # so another call (or another expert of the same architecture) reuses them.
        _compiled_step = torch.compile(_step, dynamic=False, fullgraph=True)
    return _compiled_step


def resolve_mode(mode: StepMode | Literal["auto"] | bool | None, lm: StageLM) -> StepMode:
    """`compile=` of generate: True / "compile", False / None / "eager", "cuda-graph", or "auto"."""
    if mode is True:
        return "compile"
    if mode is False or mode is None:
        return "eager"
    if mode == "auto":
        return "cuda-graph" if lm.final_norm.weight.device.type == "cuda" else "eager"
    if mode not in STEP_MODES:
        raise ValueError(f"compile={mode!r}: expected True, False, 'auto' or one of {', '.join(STEP_MODES)}")
    if mode == "cuda-graph" and lm.final_norm.weight.device.type != "cuda":
        raise ValueError("compile='cuda-graph' needs the model on a CUDA device; use compile=True or False on the CPU")
    return mode


class StepRunner:
    """Runs decode steps for one generate call: `logits = runner(column [B, K, 1], positions [B, 1])`."""

    def __init__(self, lm: StageLM, cache: KVCache, mask: torch.Tensor, mode: StepMode = "eager") -> None:
        if not cache.static:
            raise ValueError("StepRunner needs a static KV cache (lm.new_cache(..., static=True))")
        self.lm, self.cache, self.mask = lm, cache, mask
        B, K = mask.shape[0], lm.config.streams
        device = mask.device
        self.tokens = torch.zeros(B, K, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.mode = mode
        self._graph = None
        self._graph_out: torch.Tensor | None = None

    def __call__(self, column: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(column)
        self.positions.copy_(positions)
        if self.mode == "compile":
            out = self._run_compiled()
        elif self.mode == "cuda-graph":
            out = self._run_graph()
        else:
            out = _step(self.lm, self.cache, self.tokens, self.positions, self.mask)
        self.cache.advance(1)
        return out

    def _run_compiled(self) -> torch.Tensor:
        global _compile_failed
        if _compile_failed is None:
            try:
                return _compiled()(self.lm, self.cache, self.tokens, self.positions, self.mask)
            except Exception as exc:  # no C++ compiler, an unsupported backend, ...: eager still works
                _compile_failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                warnings.warn(f"torch.compile is not usable here ({_compile_failed[:200]}); decoding in eager mode",
                              RuntimeWarning, stacklevel=3)
        self.mode = "eager"
        return _step(self.lm, self.cache, self.tokens, self.positions, self.mask)

    def _run_graph(self) -> torch.Tensor:
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_out.clone()

    def _capture(self) -> None:
        """Warm up on a side stream (kernel selection, allocator), then capture one step.

        The captured step writes the cache slot in `cache.step` and reads the buffers in
        place, so replaying it after `advance` and new inputs is the next step. The warm-up
        writes slot `cache.step` too; the first replay overwrites it with the same values.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _step(self.lm, self.cache, self.tokens, self.positions, self.mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_out = _step(self.lm, self.cache, self.tokens, self.positions, self.mask)
        self._graph = graph


def compile_failure() -> str | None:
    """Why torch.compile fell back to eager in this process (None: it did not)."""
    return _compile_failed
