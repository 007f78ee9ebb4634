"""PGPOGRPOTrainer under 2 processes (gloo, CPU) where only one rank's batch holds an image.

Under FSDP / ZeRO-3 every forward of the policy gathers its sharded parameters: a collective, which every rank must
run the same number of times. On CPU, TRL runs DDP (whose no-grad forwards of the bare model make no collective),
so the test makes each PGPO forward a collective, as sharding does: a forward pre-hook on the policy all-reduces
once while the PGPO passes run. A rank that skipped its forwards (no image) would leave the other blocked in that
all-reduce, paired with a different collective: the run hangs or fails, and the parent's timeout turns that into
a test failure. The run must finish, exactly one rank must have held images, both ranks must have run the same
number of PGPO forwards, and the weights must be those one process computes on the same batch.

The workers are torch.multiprocessing processes with torchrun's environment (RANK, WORLD_SIZE, ...), as in
tests/train/test_distributed.py; accelerate picks it up and runs TRL's multi-CPU (gloo) path.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TIMEOUT_S = 240  # a hang becomes a failure after this long (the run itself takes ~30 s on 2 cores)


def _dataset():
    from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
    from pgpo_train.data.tasks import make_count_records

    rows = []
    for r, img in zip(make_count_records(2, seed=1), (True, False)):
        text = {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=r["problem"])}
        rows.append({"images": [r["image"]] if img else [],
                     "prompt": [{"role": "user", "content": [{"type": "image"}, text] if img else [text]}]})
    return datasets.Dataset.from_list(rows)


def _reward(completions, **kwargs):
    return [float(sum(map(ord, c[0]["content"])) % 7) for c in completions]


def _config(out_dir):
    from pgpo_train.integrations import PGPOConfig

    # 2 prompts x 2 generations = the global batch; each rank gets one prompt's group
    return PGPOConfig(output_dir=str(out_dir), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", bf16=False, seed=0, pgpo_backend="torch")


def _recording_trainer_cls():
    import torch.distributed as dist

    from pgpo_train.integrations import PGPOGRPOTrainer

    class Recording(PGPOGRPOTrainer):
        """Each forward during the PGPO passes is a collective (as under FSDP / ZeRO-3); records the batch,
        the weights and the number of PGPO forwards."""

        def _pgpo_weights(self, output, mask):
            if not hasattr(self, "_pgpo_hooked"):
                self._pgpo_hooked, self.pgpo_forwards, self.records = True, [0], []
                self._in_pgpo = False

                def gather_like_a_shard(module, args, kwargs):
                    if self._in_pgpo:
                        self.pgpo_forwards[0] += 1
                        if dist.is_initialized():
                            dist.all_reduce(torch.ones(1))

                self.model.register_forward_pre_hook(gather_like_a_shard, with_kwargs=True)
            self._in_pgpo = True
            try:
                w, s = super()._pgpo_weights(output, mask)
            finally:
                self._in_pgpo = False
            self.records.append({"output": {k: v for k, v in output.items() if isinstance(v, (torch.Tensor, list))},
                                 "mask": mask.clone(), "weights": w.clone(), "has_image": "pixel_values" in output})
            return w, s

    return Recording


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pgpo_train.models.tiny_families import build_tiny_family

    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    trainer = _recording_trainer_cls()(model=model, reward_funcs=_reward, args=_config(out_dir),
                                       train_dataset=_dataset(), processing_class=processor)
    assert trainer.accelerator.num_processes == world
    trainer.train()
    torch.save({"records": trainer.records, "forwards": trainer.pgpo_forwards[0]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_one_without_images_finish_with_one_process_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    finished = False
    try:
        for _ in range(TIMEOUT_S):
            if ctx.join(timeout=1):
                finished = True
                break
    finally:
        if not finished:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
    assert finished, f"the 2-rank run did not finish in {TIMEOUT_S} s: ranks ran unpaired collectives"

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    has_image = [[rec["has_image"] for rec in r["records"]] for r in ranks]
    assert sorted(has_image) == [[False], [True]], has_image  # exactly one rank held images
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0  # the same PGPO forwards, hence collectives

    # one process, same initial policy, on each rank's batch: the same weights
    from pgpo_train.models.tiny_families import build_tiny_family

    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    single = _recording_trainer_cls()(model=model, reward_funcs=_reward, args=_config(tmp_path / "single"),
                                      train_dataset=_dataset(), processing_class=processor)
    assert single.accelerator.num_processes == 1
    for r in ranks:
        (rec,) = r["records"]
        with torch.no_grad():
            w, _ = single._pgpo_weights(rec["output"], rec["mask"])
        torch.testing.assert_close(rec["weights"], w, atol=1e-6, rtol=1e-6)
        if rec["has_image"]:
            m = rec["mask"].bool()
            assert float(w[m].max() - w[m].min()) > 1e-3  # reshaped: the comparison is not between all-ones
        else:
            assert torch.equal(w, rec["mask"].float())  # zero-weight passes: uniform weights
