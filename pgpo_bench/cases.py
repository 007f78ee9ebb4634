"""Benchmark cases: the inputs of each op at one size, the bytes it must move, and its error against float64.

A case is built once per (op, tokens) and shared by every backend, so all backends read the very same tensors.
Sizes (N = tokens, V = vocab, H = hidden, B x T = sequences x tokens per sequence, with B * T = N):

    kl       logits_vis, logits_txt [N, V]                  -> kl [N]
    reshape  scores [B, T] float32, mask [B, T] bool         -> weights [B, T]
    weights  logits_vis, logits_txt [B, T, V], mask [B, T]   -> (weights [B, T], kl [B, T])
    linear   hidden_vis, hidden_txt [N, H], lm_head [V, H]   -> kl [N]
    stats    logits_vis, logits_txt [N, V], target_ids [N]   -> (logp, entropy, kl) [N] each

The byte count of a case is the least traffic any implementation needs: every input read once, every output written
once, no intermediate. Effective bandwidth = bytes / time, so a backend that builds [N, V] temporaries shows up slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field

import torch

from pgpo_kernels.defaults import BETA  # reshape at the method's defaults in every backend and the reference
from pgpo_kernels.defaults import EPS
from pgpo_kernels.defaults import TAU
from pgpo_kernels.reference import linear_logits_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reference import token_entropy_ref
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.reference import token_logprob_ref

OPS = ("kl", "reshape", "weights", "linear", "stats")
STATS_FIELDS = ("logp", "entropy", "kl")

# our choice: logits of spread ~2 nats, and a text-only pass that differs from the visual one by noise whose size
# varies per token (uniform in [0, 2 x 0.5]): KLs from ~0 to ~0.5 (bf16, V = 32768 and 152064: median 0.13, max
# 0.54), so tokens differ in visual dependency as in a VLM and the per-sequence min-max of the reshape is well
# spread. None of it changes the memory traffic being measured.
LOGIT_STD = 2.0
TXT_NOISE_STD = 0.5
REF_CHUNK_ROWS = 256  # rows of a float64 [rows, V] reference computed at once


@dataclass
class Case:
    """One op at one size, with everything a backend and the error check need.

    Attributes:
        op: one of OPS.
        tokens: N, the number of token rows (B * T for the per-sequence ops).
        dtype: dtype of the logits / hidden states.
        device: where the inputs live.
        shape: the sizes that define the case (N, V, H, B, T as they apply).
        inputs: the op's input tensors by name.
        bytes_moved: least bytes read + written by any implementation.
        flops: multiply-adds x 2 for the matmul op, None for the bandwidth-bound ones.
        check_index: [k] rows (or sequences, for reshape/weights) on which the float64 error is measured.
    """

    op: str
    tokens: int
    dtype: torch.dtype
    device: torch.device
    shape: dict[str, int]
    inputs: dict[str, torch.Tensor]
    bytes_moved: int
    flops: int | None = None
    check_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _refs: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def references(self) -> dict[str, torch.Tensor]:
        """The float64 oracle's outputs on the check rows (CPU), computed once and shared by all backends."""
        if self._refs is None:
            self._refs = _references(self)
        return self._refs


def split_tokens(tokens: int, seq_len: int) -> tuple[int, int]:
    """(B, T) with B * T = tokens and T = min(seq_len, tokens) when it divides tokens, else one sequence of all."""
    t = max(1, min(seq_len, tokens))
    if tokens % t:
        return 1, tokens  # our choice: a ragged split would change the byte count; keep one sequence instead
    return tokens // t, t


def _subset(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Up to k evenly spread indices in [0, n), first and last included."""
    if n <= k:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long().unique()


def _logit_pair(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    a = torch.randn(shape, dtype=dtype, device=device, generator=gen).mul_(LOGIT_STD)
    noise = torch.rand(shape[:-1] + (1,), device=device, generator=gen).mul_(2 * TXT_NOISE_STD).to(dtype)  # [..., 1]
    b = torch.randn(shape, dtype=dtype, device=device, generator=gen).mul_(noise).add_(a)
    return a, b


def _valid_mask(n_seq: int, seq_len: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    # our choice: each sequence keeps a valid prefix of random length in [T/2, T], the rest is padding
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (n_seq, 1), device=device, generator=gen)
    return torch.arange(seq_len, device=device).unsqueeze(0) < lengths  # [B, T] bool


def build_case(
    op: str,
    tokens: int,
    *,
    vocab: int,
    hidden: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    check_rows: int = 32,
    seed: int = 0,
) -> Case:
    """Random inputs of `op` with `tokens` rows on `device` (deterministic for a seed)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if tokens < 1 or vocab < 1 or hidden < 1 or seq_len < 1:
        raise ValueError(f"tokens, vocab, hidden and seq_len must be >= 1, got {tokens}, {vocab}, {hidden}, {seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed)
    item = torch.tensor([], dtype=dtype).element_size()
    n, v = tokens, vocab
    if op == "kl":
        a, b = _logit_pair((n, v), dtype, device, gen)
        return Case(op, n, dtype, device, {"N": n, "V": v}, {"logits_vis": a, "logits_txt": b},
                    bytes_moved=2 * n * v * item + 4 * n, check_index=_subset(n, check_rows, device))
    if op == "reshape":
        n_seq, t = split_tokens(n, seq_len)
        scores = torch.empty((n_seq, t), device=device).exponential_(generator=gen)  # KL-like scores >= 0
        mask = _valid_mask(n_seq, t, device, gen)
        # scores read (4 B) + mask read (1 B) + weights written (4 B) per token
        return Case(op, n, dtype, device, {"N": n, "B": n_seq, "T": t}, {"scores": scores, "mask": mask},
                    bytes_moved=9 * n, check_index=_subset(n_seq, max(1, check_rows // 4), device))
    if op == "weights":
        n_seq, t = split_tokens(n, seq_len)
        a, b = _logit_pair((n_seq, t, v), dtype, device, gen)
        mask = _valid_mask(n_seq, t, device, gen)
        # both logits read once + mask read + weights and kl written
        return Case(op, n, dtype, device, {"N": n, "B": n_seq, "T": t, "V": v},
                    {"logits_vis": a, "logits_txt": b, "mask": mask},
                    bytes_moved=2 * n * v * item + n + 8 * n,
                    check_index=_subset(n_seq, max(1, check_rows // 16), device))  # whole sequences of T rows
    if op == "linear":
        h = hidden
        x = torch.randn((n, h), dtype=dtype, device=device, generator=gen)
        x_txt = torch.randn((n, h), dtype=dtype, device=device, generator=gen).mul_(0.3).add_(x)
        # lm_head scaled so logits have spread ~LOGIT_STD
        w = torch.randn((v, h), dtype=dtype, device=device, generator=gen).mul_(LOGIT_STD / math.sqrt(h))
        return Case(op, n, dtype, device, {"N": n, "H": h, "V": v},
                    {"hidden_vis": x, "hidden_txt": x_txt, "lm_head_weight": w},
                    bytes_moved=(2 * n * h + v * h) * item + 4 * n, flops=2 * 2 * n * h * v,
                    check_index=_subset(n, check_rows, device))
    # stats
    a, b = _logit_pair((n, v), dtype, device, gen)
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    return Case(op, n, dtype, device, {"N": n, "V": v}, {"logits_vis": a, "logits_txt": b, "target_ids": target},
                bytes_moved=2 * n * v * item + 8 * n + 12 * n, check_index=_subset(n, check_rows, device))


# %% error against the float64 reference ---------------------------------------------------------------------------
def _field(out, name: str) -> torch.Tensor:
    """A named output of a stats-like result: NamedTuple / object attribute or dict key."""
    if isinstance(out, dict):
        return out[name]
    return getattr(out, name)


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in float64; inf if any output is NaN or inf."""
    out = out.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} does not match the reference {tuple(ref.shape)}")
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).abs().max()) if out.numel() else 0.0


def _references(case: Case) -> dict[str, torch.Tensor]:
    """float64 oracle outputs on the check rows; the rows are gathered on the device, the oracle runs there too
    (a float64 [k, V] or lm_head product is quick on a GPU), and the results come back to the CPU."""
    x, idx = case.inputs, case.check_index
    rows = lambda name: x[name][idx].detach()
    if case.op == "kl":
        refs = {"kl": token_kl_ref(rows("logits_vis"), rows("logits_txt"))}
    elif case.op == "reshape":
        # the per-sequence loop of the oracle syncs on every sequence: run it on the host
        refs = {"weights": reshape_weights_ref(rows("scores").cpu(), rows("mask").cpu(), tau=TAU, beta=BETA, eps=EPS)}
    elif case.op == "weights":
        # [k, T, V] float64 at once would be GBs at V = 152064: the KL in row chunks on the device, then the reshape
        a, b = rows("logits_vis"), rows("logits_txt")
        kl = torch.cat([token_kl_ref(a.flatten(0, 1)[lo:lo + REF_CHUNK_ROWS], b.flatten(0, 1)[lo:lo + REF_CHUNK_ROWS])
                        for lo in range(0, a.shape[0] * a.shape[1], REF_CHUNK_ROWS)]).reshape(a.shape[:2]).cpu()
        refs = {"weights": reshape_weights_ref(kl, rows("mask").cpu(), tau=TAU, beta=BETA, eps=EPS), "kl": kl}
    elif case.op == "linear":
        w = x["lm_head_weight"].detach().double()  # [V, H] float64 once per case (.double() of it is a no-op)
        refs = {"kl": token_kl_ref(linear_logits_ref(rows("hidden_vis"), w), linear_logits_ref(rows("hidden_txt"), w))}
        del w
    else:
        a, b, tgt = rows("logits_vis"), rows("logits_txt"), rows("target_ids")
        refs = {"logp": token_logprob_ref(a, tgt), "entropy": token_entropy_ref(a), "kl": token_kl_ref(a, b)}
    return {k: v.cpu() for k, v in refs.items()}


def max_abs_errors(case: Case, out) -> dict[str, float]:
    """Max abs error of each output of `out` against the float64 oracle, on the case's check rows/sequences."""
    idx = case.check_index
    if case.op == "weights":
        w, kl = out
        outs = {"weights": w, "kl": kl}
    elif case.op == "stats":
        outs = {name: _field(out, name) for name in STATS_FIELDS}
    else:
        outs = {next(iter(case.references())): out}
    return {name: _max_abs(outs[name][idx], ref) for name, ref in case.references().items()}
