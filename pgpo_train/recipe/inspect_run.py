"""`pgpo-train inspect`: one sample's response tokens coloured by visual dependency (token KL), as HTML or PNG."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os

import torch
from PIL import Image

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import record_images
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.rewards import compute_score
from pgpo_train.models import model_family
from pgpo_train.models.policy import eos_ids
from pgpo_train.models.policy import load_policy
from pgpo_train.models.policy import resolve_device
from pgpo_train.rl import core_algos
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.config import config_from_dict
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import model_inputs
from pgpo_train.step.batching import response_mask_from
from pgpo_train.step.scoring import old_logp_and_scores
from pgpo_train.step.scoring import token_weights


@torch.no_grad()
def token_dependency(model, processor, record: dict, cfg: TrainConfig, greedy: bool = True) -> dict:
    """Generates a response for one record and scores each response token.

    Returns:
        {"tokens": [T] strings, "kl", "intensity" (I_t), "weights": [T] floats, "text": str, "score": dict}
    """

    device = next(model.parameters()).device
    model.eval()
    prompt = encode_prompts(processor, [record], cfg.prompt_template, 1, device)
    stop = eos_ids(model, processor)
    gen = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
    out = model.generate(
        **model_inputs(prompt),
        **gen,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=model_family.special_ids(model),
    )
    responses = out[:, prompt["input_ids"].shape[1] :]
    mask = response_mask_from(responses, stop)
    batch = build_sequences(model, prompt, responses, mask, processor.tokenizer.pad_token_id)
    stats = old_logp_and_scores(model, batch, cfg, {})
    w = token_weights(stats["scores"], mask, cfg)  # [1, T], as the training step weights them
    intensity = core_algos.normalized_scores(stats["scores"], mask, cfg.pgpo.eps)  # [1, T], PGPO's I_t
    n = int(mask.sum())
    ids = batch["responses"][0, :n].tolist()
    text = processor.tokenizer.decode(ids, skip_special_tokens=True)
    return {
        "tokens": [processor.tokenizer.decode([i]) for i in ids],
        "kl": stats["scores"][0, :n].tolist(),
        "intensity": intensity[0, :n].tolist(),
        "weights": w[0, :n].tolist(),
        "text": text,
        "score": compute_score(text, record["answer"], cfg.acc_weight, cfg.format_weight),
    }


def side_by_side(images: list) -> Image.Image:
    """A record's images in one row (its one image as it is), for the HTML and PNG views."""
    if len(images) == 1:
        return images[0]
    row = Image.new("RGB", (sum(im.width for im in images) + 4 * (len(images) - 1), max(im.height for im in images)),
                    "white")
    x = 0
    for im in images:
        row.paste(im, (x, 0))
        x += im.width + 4
    return row


def render_html(record: dict, dep: dict, tau: float) -> str:
    buf = io.BytesIO()
    side_by_side(record_images(record)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    spans = []
    for tok, kl, w, i in zip(dep["tokens"], dep["kl"], dep["weights"], dep["intensity"]):
        color = f"rgba(220, 40, 40, {0.08 + 0.85 * i:.3f})"
        border = "2px solid #222" if i >= tau else "1px solid #ccc"
        spans.append(
            f'<span title="KL {kl:.4g} | I {i:.2f} | weight {w:.2f}" style="background:{color};border:{border};'
            f'padding:2px 3px;margin:1px;border-radius:3px;font-family:monospace;white-space:pre">{html.escape(tok)}</span>'
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pgpo-train inspect</title></head>
<body style="font-family:sans-serif;max-width:900px;margin:2em auto">
<h3>Visual dependency of each response token</h3>
<p>Colour: min-max normalized log(1 + KL(p<sub>vis</sub> || p<sub>txt</sub>)) per token (PGPO's I<sub>t</sub>);
framed tokens have I &ge; tau = {tau} and get amplified advantage. Hover a token for KL, I and weight.</p>
<img src="data:image/png;base64,{img}" style="height:168px;image-rendering:pixelated;border:1px solid #999">
<p><b>Question:</b> {html.escape(record["problem"])} &nbsp; <b>Answer:</b> {html.escape(record["answer"])}
&nbsp; <b>Reward:</b> {dep["score"]["score"]:.2f}</p>
<p style="line-height:2.2">{"".join(spans)}</p>
<pre style="font-size:11px;color:#555">{html.escape(json.dumps({"kl": dep["kl"], "weights": dep["weights"]}))}</pre>
</body></html>"""


def render_png(record: dict, dep: dict, tau: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inten = dep["intensity"]
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 5]})
    ax_img.imshow(side_by_side(record_images(record)))
    ax_img.set_title(f"{record['problem']} (answer {record['answer']})", fontsize=8)
    ax_img.axis("off")
    xs = range(len(dep["tokens"]))
    ax_bar.bar(xs, dep["kl"], color=[(0.86, 0.16, 0.16, 0.15 + 0.8 * i) for i in inten], edgecolor="k")
    ax_bar.set_xticks(list(xs))
    ax_bar.set_xticklabels([t.replace("$", r"\$") for t in dep["tokens"]], rotation=60, fontsize=8)
    ax_bar.set_ylabel("token KL(vis || txt)")
    ax_bar.set_title(
        f"response tokens coloured by visual dependency (tau = {tau}); reward {dep['score']['score']:.2f}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def inspect_main(args) -> str:
    """Entry point of `pgpo-train inspect` (args from cli._inspect_parser)."""

    cfg = TrainConfig(progress=False, tensorboard=False)
    ckpt = None
    if args.run:
        with open(os.path.join(args.run, "config.json")) as f:
            cfg = config_from_dict(json.load(f))
        ckpt = latest_checkpoint(os.path.join(args.run, "checkpoints"))
        if ckpt is None:
            raise SystemExit(f"pgpo-train inspect: no checkpoint under {args.run}/checkpoints")
    if args.model:
        cfg.model = args.model
    if args.dataset:
        cfg.dataset = args.dataset
    cfg = dataclasses.replace(cfg, algo="pgpo", max_new_tokens=args.max_new_tokens or cfg.max_new_tokens)
    cfg.pgpo = dataclasses.replace(cfg.pgpo, estimator=args.estimator, tau=args.tau, beta=args.beta)
    cfg = cfg.resolved()
    device = resolve_device(cfg)
    model, processor = load_policy(cfg, device)
    if ckpt is not None:
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
    cols = {"image": cfg.image_column, "problem": cfg.problem_column, "answer": cfg.answer_column}
    ds = load_split(cfg.dataset or tiny_dataset_path(seed=0, task=cfg.task), args.split, cols)
    if not 0 <= args.index < len(ds):
        raise SystemExit(f"pgpo-train inspect: --index {args.index} out of range for {len(ds)} records")
    record = RecordStream(ds.select([args.index]), cols, Sampler(1, 0)).next_batch(1)[0]
    dep = token_dependency(model, processor, record, cfg, greedy=args.greedy)
    if args.out.endswith(".png"):
        render_png(record, dep, cfg.pgpo.tau, args.out)
    else:
        with open(args.out, "w") as f:
            f.write(render_html(record, dep, cfg.pgpo.tau))
    return args.out
