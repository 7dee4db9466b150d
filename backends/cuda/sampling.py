"""The sampler step on torch tensors in few passes over the vocabulary, chunk by chunk (the PyTorch `fused_step`).

`dgemma.sampler.step_with_temperature` writes the step as the reference does: a division, a logsumexp, a subtraction,
a softmax of the log-probs, a clamp, a product and a sum for the entropy, an argmax and a cumsum over the vocabulary
for the categorical draw: ten passes over [B, C, V] float32 arrays, four of them freshly allocated. At V = 262144 and
C = 256 each array is 268 MB, so a CPU spends the step streaming memory and faulting in new pages.

Here the positions are taken a chunk at a time, sized to stay in the CPU's cache, and each chunk goes through the
reference's own operations, one row at a time, in a buffer reused for every chunk: the passes hit the cache instead of
memory and nothing is allocated per pass. Every value is the op-by-op step's bit for bit (each operation reduces along
a row, so a chunk of rows computes what the whole array does; tests check it), the draw included: its CDF is the
row's cumsum in order, as the reference's. Only `probs` is written to memory (the next pass's self-conditioning needs
it), into a buffer reused from pass to pass when the caller allows it.
"""

from __future__ import annotations

import math

import torch

from dgemma.sampler import entropy_bound_accept

FLOAT32_MIN = torch.finfo(torch.float32).min
CPU_CHUNK_BYTES = 4 << 20  # one chunk of processed logits: fits the L2/L3 cache beside its probs


def inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative mass reaches u * total, per row of cdf [..., V]: the reference's draw (its
    multinomial, with the tests' injected uniforms), which reads the cumsum of the whole row in order."""
    target = (uniforms * cdf[..., -1]).unsqueeze(-1).to(cdf.dtype)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def logsumexp(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, -1, keepdim=True) bit for bit (its own steps: max, inf maxima zeroed, exp of the shifted
    values, sum, log, add), with the shifted values in `scratch` instead of a fresh array per call."""
    top = x.amax(-1, keepdim=True)
    top.masked_fill_(top.abs() == float("inf"), 0.0)
    return torch.sub(x, top, out=scratch).exp_().sum(-1, keepdim=True).log_().add_(top)


class Workspace:
    """Flat buffers kept between passes, one per role, grown on demand and viewed at the shape asked: a fresh 268 MB
    array (logits or probs at V = 262144, C = 256) costs its page faults again on every pass (measured here: 126 ms to
    allocate and fill one against 11 ms to refill a kept one)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < n or buf.device != like.device or buf.dtype != dtype:
            self._buffers.pop(role, None)  # the old one is freed before the new one is made
            buf = self._buffers[role] = torch.empty(n, dtype=dtype, device=like.device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


class ChunkedSampler:
    """`fused_step(logits, canvas, t, bound, uniforms, renoise, reuse=False)`: the sampler step of
    `dgemma.sampler.step_with_temperature`, returning the same tuple. `t` is a float or a [B, 1, 1] tensor, `bound` a
    float or [B, 1]. With `reuse` the returned probs live in a buffer the next call overwrites (the engine consumes
    them within the pass); logits are never written."""

    def __init__(self, ops, chunk_bytes: int = CPU_CHUNK_BYTES):
        self.ops = ops  # the backend's TorchOps: the acceptance rule written once in dgemma.sampler, its workspace
        self.chunk_bytes = chunk_bytes
        self.workspace = ops.workspace
        self._ramps: dict = {}

    @torch.inference_mode()  # the workspace's buffers are inference tensors, written in place on every call
    def __call__(self, logits, canvas, t, bound, uniforms, renoise, reuse: bool = False):
        B, C, V = logits.shape
        N = B * C
        x = logits.reshape(N, V)
        probs = self.workspace.get("probs", (N, V), x) if reuse else torch.empty(N, V, device=x.device)
        temps = t.float().expand(B, C, 1).reshape(N, 1) if torch.is_tensor(t) else t
        entropy, argmax, sampled = self._chunks(x, probs, temps, uniforms.reshape(N))
        entropy, argmax, sampled = entropy.view(B, C), argmax.view(B, C), sampled.view(B, C)
        accepted = entropy_bound_accept(self.ops, entropy, bound)
        next_canvas = torch.where(accepted, sampled, renoise)
        return next_canvas, argmax, probs.view(B, C, V), entropy.mean(-1), accepted, entropy

    def _chunks(self, x, probs, temps, uniforms):
        N, V = x.shape
        rows = N if x.device.type != "cpu" else max(1, min(N, self.chunk_bytes // (4 * V)))
        work = self.workspace.get("chunk", (rows, V), x)
        entropy = torch.empty(N, device=x.device)
        argmax = torch.empty(N, dtype=torch.long, device=x.device)
        sampled = torch.empty(N, dtype=torch.long, device=x.device)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            t = temps if not torch.is_tensor(temps) else temps[a:b]
            entropy[a:b], argmax[a:b] = self._softmax_chunk(x[a:b], t, work[: b - a], probs[a:b])
            # The cumsum goes through the chunk's buffer, in the row's order: the reference's CDF bit for bit, so
            # the token drawn is the reference's for every uniform, those at a CDF boundary included.
            sampled[a:b] = inverse_cdf(torch.cumsum(probs[a:b], -1, out=work[: b - a]), uniforms[a:b])
        return entropy, argmax, sampled

    def _softmax_chunk(self, logits, t, work, probs):
        """Writes softmax(log-probs) into probs; returns (entropy, argmax) per row. The reference's operations on
        one row at a time, so every value is bit for bit the op-by-op step's; `work` ends as clamped log-probs."""
        torch.div(logits, t, out=work)
        argmax = self._first_max(work, probs)
        work.sub_(logsumexp(work, probs))
        torch.softmax(work, -1, out=probs)
        return work.clamp_(min=FLOAT32_MIN).mul_(probs).sum(-1).neg_(), argmax

    def _first_max(self, x, scratch):
        """argmax(x, -1) (the first of equal maxima) in three fast passes: torch's CPU argmax is a scalar loop, 3x
        slower than amax + ge + amax over a [V..1] ramp. `scratch` is overwritten."""
        V = x.shape[-1]
        ramp = self._ramps.get((V, x.device))
        if ramp is None:  # V < 2**24, so every value is exact in float32
            ramp = self._ramps[V, x.device] = torch.arange(V, 0, -1, dtype=torch.float32, device=x.device)
        first = torch.ge(x, x.amax(-1, keepdim=True), out=scratch).mul_(ramp).amax(-1)
        return (V - first.long()).clamp_(0, V - 1)  # a NaN row matches nothing: clamp into the vocabulary
