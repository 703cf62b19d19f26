"""The baseline: Hugging Face Trainer + DeepSpeed ZeRO-3, the path LLaMA-Factory's pretraining stage takes.

    torchrun --nproc_per_node N benchmarks/hf_trainer_baseline.py --model DIR --data FILE.jsonl \
        --micro-batch 4 --global-batch 32 --steps 12 --out OUT.json [--zero 2] [--liger]

Same model config, tokenizer, packed text and global batch as our runs; the DeepSpeed config is the usual
ZeRO-3 one of that stack (HF "auto" values, overlap_comm, contiguous gradients, bf16), or with ``--zero 2`` the
ZeRO-2 one of LLaMA-Factory's examples (examples/deepspeed/ds_z2_config.json). ``--liger`` turns on the Trainer's
``use_liger_kernel`` (Liger's Triton RMSNorm, SwiGLU, rotary and fused linear cross-entropy; needs liger-kernel).
Tokens/s per GPU is measured from the wall time of each optimizer step after ``--warmup`` steps, the same way our
metrics do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# zero_optimization of the usual configs of that stack: HF's "auto" ZeRO-3, LLaMA-Factory's ds_z2_config.json
ZERO = {
    3: {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    2: {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": True,
        "round_robin_gradients": True,
    },
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="directory with config.json and the tokenizer")
    p.add_argument("--data", required=True, help="jsonl with a text field")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--zero", type=int, choices=[2, 3], default=3, help="DeepSpeed ZeRO stage")
    p.add_argument("--liger", action="store_true", help="Liger kernels (TrainingArguments.use_liger_kernel)")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    import torch
    from torch.utils.data import Dataset
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from launcher.data.packing import pack
    from launcher.metrics import flops_per_token, memory_stats, mfu, peak_flops
    from launcher.model import param_counts

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    accum = args.global_batch // (args.micro_batch * world)
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(args.model)
    blocks_needed = args.global_batch * args.steps // world + args.micro_batch

    def documents():
        with open(args.data) as f:
            for line in f:
                yield tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]

    blocks = []
    while len(blocks) < blocks_needed:  # the corpus repeats when it is smaller than the run
        for b in pack(documents(), args.seq_len, keep_partial=False, eos_id=tok.eos_token_id):
            blocks.append(b)
            if len(blocks) >= blocks_needed:
                break

    class Blocks(Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.tensor(blocks[i])
            return {"input_ids": ids, "labels": ids.clone()}

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": ZERO[args.zero],
    }
    targs = TrainingArguments(
        output_dir=str(Path(args.out).with_suffix(".trainer")), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=3e-4, warmup_steps=2,
        lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=1.0, bf16=cuda, logging_steps=1,
        save_strategy="no", report_to=[], deepspeed=ds_config, dataloader_num_workers=2, seed=42,
        use_cpu=not cuda, use_liger_kernel=args.liger,
    )  # fmt: skip
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t = 0.0

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[timer])
    result = trainer.train()
    steady = timer.times[args.warmup :] or timer.times
    step_time = sum(steady) / len(steady)
    tokens_per_gpu = args.global_batch * args.seq_len / world / step_time
    fpt = flops_per_token(config, args.seq_len, param_counts(config).total)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    record = {
        "engine": f"hf-trainer+deepspeed-zero{args.zero}" + ("+liger" if args.liger else ""),
        "gpus": world,
        "micro_batch": args.micro_batch,
        "global_batch": args.global_batch,
        "grad_accum": accum,
        "steps": args.steps,
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": mfu(tokens_per_gpu, fpt, peak_flops(device)),
        "peak_mem_gib": memory_stats(device).get("mem_peak_gib"),
        "final_loss": result.training_loss,
    }
    if rank == 0:
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
