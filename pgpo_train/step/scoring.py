"""The step's scoring passes and advantages: old log-probs with the image, the text-only pass and the token
visual-dependency scores (docs/method.md#rl-step), then token advantages A * w~_t (core_algos.pgpo_weights).
"""

from __future__ import annotations

import os

import torch

from pgpo_kernels import fused_linear_logp
from pgpo_kernels import fused_linear_token_stats
from pgpo_kernels import token_kl
from pgpo_kernels import token_stats
from pgpo_train.models.lm_head import fallback_chunk_rows
from pgpo_train.models.lm_head import lm_head_params
from pgpo_train.models.lm_head import response_hidden
from pgpo_train.models.policy import logp_entropy
from pgpo_train.models.policy import response_logits
from pgpo_train.models.policy import response_logp
from pgpo_train.rl import core_algos
from pgpo_train.rl.weight_variants import control_generator
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.run_log import timed
from pgpo_train.step.batching import select_rows
from pgpo_train.step.batching import text_only_kwargs
from pgpo_train.step.batching import visual_kwargs


@torch.no_grad()
def old_logp_and_scores(model, batch: dict, cfg: TrainConfig, times: dict, fused_lm_head: bool = False) -> dict:
    """Old log-probs with the image and, for pgpo, token visual-dependency scores from the text-only pass.

    Works micro-batch by micro-batch. With `fused_lm_head` both passes stop at the last hidden states [mb, T, H]
    and pgpo_kernels.fused_linear_token_stats (grpo/dapo: fused_linear_logp) applies the lm_head tile by tile: no
    [mb, T, V] logits exist. Otherwise at most one micro-batch's [mb, T, V] logits of each pass are alive, at response positions only.

    Returns:
        dict with old_logp [B, T], entropy [B, T] and (pgpo) scores [B, T].
    """
    model.eval()
    B, T = batch["responses"].shape
    old_logp, entropy, scores = [], [], []
    pgpo = cfg.algo == "pgpo"
    fused = pgpo and fused_lm_head
    # PGPO_NO_TOKEN_STATS=1: the logits path's unfused ops (torch log-softmax + token_kl / k3), to compare with
    unfused = os.environ.get("PGPO_NO_TOKEN_STATS") == "1"
    logits_temp = None if pgpo and not unfused else cfg.temperature  # None: token_stats scales bf16 logits itself
    for start in range(0, B, cfg.micro_batch_size):
        mb = select_rows(model, batch, torch.arange(start, min(B, start + cfg.micro_batch_size)))
        with timed(times, "timing/old_logp"):
            kw = visual_kwargs(model, mb)
            if fused_lm_head and not pgpo:  # [mb, T] straight from hidden states
                vis = None
                lp, ent = response_logp(model, kw, mb["responses"], cfg.temperature, True, cfg.pgpo.backend, True)
            elif fused:
                vis = response_hidden(model, kw, T)  # [mb, T, H]; the vision tower ran (pixel_values in kw)
            else:
                vis = response_logits(model, kw, T, logits_temp)  # [mb, T, V]
                if not pgpo or unfused:
                    lp, ent = logp_entropy(vis, mb["responses"])
        if not pgpo:
            old_logp.append(lp)
            entropy.append(ent)
            del vis
            continue
        with timed(times, "timing/text_only"):
            kw = text_only_kwargs(model, mb)
            txt = response_hidden(model, kw, T) if fused else response_logits(model, kw, T, logits_temp)
        with timed(times, "timing/kl_reshape"):
            if fused:
                weight, bias = lm_head_params(model)
                st = fused_linear_token_stats(
                    vis,
                    txt,
                    weight,
                    mb["responses"],
                    bias,
                    temperature=cfg.temperature,
                    chunk_size=fallback_chunk_rows(weight, cfg.pgpo.backend),
                    estimator=cfg.pgpo.estimator,
                    backend=cfg.pgpo.backend,
                )
                lp, ent, s = st.logp, st.entropy, st.kl  # [mb, T] each
            elif not unfused:
                # one read of each [mb, T, V] logit view gives log-prob, entropy and S_t (no fp32 / temperature copy)
                st = token_stats(
                    vis,
                    txt,
                    mb["responses"],
                    temperature=cfg.temperature,
                    estimator=cfg.pgpo.estimator,
                    backend=cfg.pgpo.backend,
                )
                lp, ent, s = st.logp, st.entropy, st.kl  # [mb, T] each
            elif cfg.pgpo.estimator == "full":
                s = token_kl(vis, txt, backend=cfg.pgpo.backend)  # [mb, T]
            else:
                lp_txt, _ = logp_entropy(txt, mb["responses"], with_entropy=False)
                s = core_algos.k3_scores(lp, lp_txt)  # [mb, T]
            if cfg.pgpo.estimator == "k3" and (cfg.pgpo.k3_log_ratio_max > 0 or cfg.pgpo.k3_score_max > 0):
                s = clamped_k3(model, lp, txt, mb, cfg, fused, logits_temp)
        old_logp.append(lp)
        entropy.append(ent)
        scores.append(s)
        del vis, txt  # free both passes' logits / hidden states before the next micro-batch
    out = {"old_logp": torch.cat(old_logp), "entropy": torch.cat(entropy)}
    if pgpo:
        out["scores"] = torch.cat(scores)
    return out


def clamped_k3(model, lp: torch.Tensor, txt: torch.Tensor, mb: dict, cfg: TrainConfig, fused: bool,
               logits_temp: float | None) -> torch.Tensor:
    """[mb, T] k3 scores with --pgpo.k3-log-ratio-max / --pgpo.k3-score-max (core_algos.k3_scores' clamps), from
    the visual log-probs lp and the text-only pass's hidden states (fused) or logits (unscaled when logits_temp is
    None): the sampled tokens' text-only log-probs, then the clamped formula."""
    if fused:
        weight, bias = lm_head_params(model)
        lp_txt = fused_linear_logp(txt, weight, mb["responses"], bias, temperature=cfg.temperature,
                                   backend=cfg.pgpo.backend)
    else:
        logits = txt.float() / cfg.temperature if logits_temp is None else txt
        lp_txt, _ = logp_entropy(logits, mb["responses"], with_entropy=False)
    return core_algos.k3_scores(lp, lp_txt, mb["response_mask"].bool(), log_ratio_max=cfg.pgpo.k3_log_ratio_max,
                                score_max=cfg.pgpo.k3_score_max)


def token_weights(scores: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, step: int = 0) -> torch.Tensor:
    """[B, T] the run's PGPO token weights: core_algos.pgpo_weights with cfg.pgpo's options; the shuffled control's
    permutations are seeded by (cfg.seed, step), so a resumed run draws the same ones."""
    gen = control_generator(cfg.seed, step, mask.device) if cfg.pgpo.control == "shuffled" else None
    return core_algos.pgpo_weights(scores, mask, **cfg.pgpo.weight_kwargs(), generator=gen)


def token_advantages(batch: dict, cfg: TrainConfig, times: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
    """[B, T] A * w~_t (pgpo) or A broadcast (grpo/dapo), and the weight/KL metrics (core_algos.weight_metrics);
    `step` seeds the shuffled control."""
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None]  # [B, 1]
    if cfg.algo != "pgpo":
        return adv * mask.float(), {}
    with timed(times, "timing/kl_reshape"):
        w = token_weights(batch["scores"], mask, cfg, step)  # [B, T]
    tok_adv = adv * w
    stats = core_algos.weight_metrics(w, batch["scores"], mask, tau=cfg.pgpo.tau, eps=cfg.pgpo.eps, token_adv=tok_adv)
    return tok_adv, dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync
