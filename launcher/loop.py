"""The training loop: step, log, evaluate, checkpoint. Everything else hangs off callbacks on rank 0."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .callbacks import Callback, CallbackList, RunInfo, default_callbacks
from .callbacks.model_card import launch_command
from .config import Recipe, eval_overlap_warnings, to_yaml
from .data import Stage, TrainStream, eval_blocks, reblock, stage_at, stages_of
from .engine import Engine, build_engine
from .engine.background_save import background_saves
from .evaluate import evaluate
from .export import write_hf_model
from .files import atomic_write
from .gc_steps import StepCollector
from .launch import DistInfo
from .lengths import with_token_budget
from .metrics import Throughput, flops_per_token, host_memory_gib, memory_stats, mfu, peak_flops
from .model import init_checkpoint, load_config, load_tokenizer
from .preemption import PREEMPTED_EXIT_CODE, Preemption
from .profiling import StepProfiler
from .vocab import extend_vocabulary

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself on purpose (e.g. non-finite gradients under ``train.nonfinite``); the message says
    why and what was kept."""


class Trainer:
    def __init__(self, recipe: Recipe, info: DistInfo, callbacks: list[Callback] | None = None):
        self.info = info
        self.out = Path(recipe.output_dir)
        self.layout = recipe.batch_layout(info.world_size)
        # With train.max_tokens, everything below (schedule, loop, outputs) sees the steps derived from it.
        recipe = self.recipe = with_token_budget(recipe, self.layout)
        # What takes the time before the first step (downloads, weights, DeepSpeed's op builds, data), with timings.
        start = stage = time.perf_counter()
        self.tokenizer = load_tokenizer(recipe)
        # model.add_tokens and an extending model.tokenizer: the tokenizer gains the tokens, the config the rows.
        vocab = extend_vocabulary(recipe, self.tokenizer, load_config(recipe))
        self.config = vocab.config
        log.info("tokenizer and model config loaded in %.1f s", time.perf_counter() - stage)
        if info.is_main:
            for line in vocab.warnings:
                log.warning("%s", line)
            if summary := vocab.summary():
                log.info("%s", summary)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "resolved_recipe.yaml", to_yaml(recipe))
        self.callbacks = CallbackList(
            (callbacks if callbacks is not None else default_callbacks(recipe)) if info.is_main else []
        )
        log.info("building the model under %s (%s)", recipe.parallel.engine, recipe.parallel.config)
        stage = time.perf_counter()
        self.engine: Engine = build_engine(recipe, info, self.layout, self.config, vocab.extension)
        log.info("engine ready in %.1f s; host memory %.2f GiB (peak %.2f GiB)", time.perf_counter() - stage,
                 *host_memory_gib())  # fmt: skip
        stage = time.perf_counter()
        d = recipe.data
        # An evaluation-only run (train.max_steps=0) needs no training data.
        self.stream = (
            TrainStream.from_config(
                d,
                self.tokenizer,
                micro_batch_size=self.layout.micro_batch_size,
                # the ranks of a sequence-parallel group read the same sequences
                rank=self.layout.data_rank(info.rank),
                world_size=self.layout.data_parallel,
                seed=recipe.train.seed,
                grad_accum=self.layout.grad_accum,
            )
            if recipe.train.max_steps > 0
            else None
        )
        if self.stream is not None:
            log.info("training data opened in %.1f s", time.perf_counter() - stage)
        self.step = 0
        self.tokens_seen = 0
        self.preempted = False
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.data_from: Path | None = None
        """The checkpoint of another run whose data position this run continues (``model.init_data``)."""
        self.saving: checkpoint.PendingSave | None = None
        """The checkpoint being written in the background (``train.async_save``), committed once every rank is done."""
        self.stalled: float | None = None
        """Seconds the last committed checkpoint stalled training, for the next metrics line."""
        self.gc_ms: float | None = None
        """Milliseconds of ``train.gc_every``'s collections since the last metrics line."""
        self.resumed_from = self._resume()
        continued = self.resumed_from is not None or self.data_from is not None
        self.passes = self.stream.passes_completed() if continued and self.stream is not None else 0
        if info.is_main:
            for warning in eval_overlap_warnings(recipe):
                log.warning("%s", warning)
        log.info("reading the eval sets: %s", ", ".join(recipe.eval_sources()) or "none")
        stage = time.perf_counter()
        self.eval_sets = {
            name: eval_blocks(src, self.tokenizer, seq_len=d.seq_len, rank=self.layout.data_rank(info.rank),
                              world_size=self.layout.data_parallel, max_blocks=recipe.eval.max_blocks)
            for name, src in recipe.eval_sources().items()
        }  # fmt: skip
        log.info("eval sets read in %.1f s (%s blocks on this rank)", time.perf_counter() - stage,
                 ", ".join(f"{name}: {len(blocks)}" for name, blocks in self.eval_sets.items()) or "no")  # fmt: skip
        self.n_params = self.engine.n_params()
        self.flops_per_token = flops_per_token(self.config, d.seq_len, self.n_params)
        self.stages = stages_of(d, self.layout.micro_batch_size)
        self.stage: Stage | None = None
        """The sequence-length stage of the step being trained (``data.seq_len_stages``)."""
        self.peak = peak_flops(info.device)
        compiling = "; the first steps also compile the model (train.compile)" if recipe.train.compile else ""
        log.info("set up in %.1f s%s", time.perf_counter() - start, compiling)

    def _resume(self) -> Path | None:
        """Resume from the newest complete checkpoint in output_dir; else start from ``model.init_from`` when the
        recipe sets it (:meth:`_branch`), from the base model otherwise. A run's own checkpoint wins over
        ``model.init_from``: a branch that was stopped resumes itself."""
        path = checkpoint.latest_checkpoint(self.out)
        init_from = self.recipe.model.init_from
        if path is None or self.stream is None:
            if init_from:
                self._branch(Path(init_from))
            return None
        if init_from:
            log.info("resuming this run's own checkpoint %s; model.init_from (%s) is not used", path, init_from)
        state, data_state, all_ranks = checkpoint.load(self.engine, self.info, path)
        self.step = state["step"]
        self.tokens_seen = state.get("tokens_seen", 0)
        # all_ranks (saved on another world size): the stream re-divides the old ranks' positions among the new ones
        self.stream.load_state_dict(data_state, all_ranks=all_ranks)
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _branch(self, source: Path) -> None:
        """A new run from ``model.init_from``. A Hugging Face model directory was read as the starting weights when
        the engine was built; from a checkpoint, its weights are loaded here, with its optimizer state
        (``model.init_optimizer``) and data position (``model.init_data``) when the recipe asks. The step, the tokens
        seen and the schedule start at 0."""
        m = self.recipe.model
        if init_checkpoint(self.recipe) is None:
            log.info("initialised from %s: weights", source)
            return
        optimizer = m.init_optimizer and self.stream is not None
        data = m.init_data and self.stream is not None
        data_state, all_ranks = checkpoint.branch(self.engine, self.info, source, optimizer=optimizer, data=data)
        if self.stream is not None and data_state is not None:
            self.stream.load_state_dict(data_state, all_ranks=all_ranks)
            self.data_from = source
        taken = ["weights", *(["optimizer state"] if optimizer else []), *(["data position"] if data else [])]
        log.info("initialised from %s: %s", source, ", ".join(taken))

    def fit(self) -> dict[str, dict[str, float]]:
        r, t = self.recipe, self.recipe.train
        if self.resumed_from is not None and self.step >= t.max_steps and t.max_steps > 0:
            if t.export_final and not (self.out / "final" / "config.json").is_file():
                # the run that got there was stopped before its export: finish it
                log.info("%s already reached train.max_steps=%d; writing the model it did not export",
                         self.resumed_from, t.max_steps)  # fmt: skip
                self._export()
            else:
                log.info("%s already reached train.max_steps=%d; nothing to do", self.resumed_from, t.max_steps)
            return {}
        run = RunInfo(
            recipe=r, output_dir=self.out, world_size=self.info.world_size, grad_accum=self.layout.grad_accum,
            global_batch_size=self.layout.global_batch_size, tokens_per_step=self.layout.tokens_per_step,
            n_params=self.engine.n_params(), start_step=self.step, max_steps=t.max_steps,
            resumed=self.resumed_from is not None,
            command=launch_command(os.environ, sys.argv[1:]),
        )  # fmt: skip
        self.callbacks.on_train_start(run)
        results: dict[str, dict[str, float]] = {}
        if self.eval_sets and (t.max_steps == 0 or (r.eval.at_start and self.step == 0)):
            results = self._evaluate()
        if t.max_steps == 0:
            self.callbacks.on_train_end(run, None)
            return results
        assert self.stream is not None
        self.engine.train()
        batches = iter(self.stream)
        speed = Throughput()
        preemption = Preemption(t.preempt_signals, self.info.device)
        profiler = StepProfiler(t.profile_steps, self.out, self.info.rank, self.info.device)
        background = background_saves(r, self.info.device.type)
        last_eval = -1
        with StepCollector(t.gc_every) as collector:
            while self.step < t.max_steps:
                start = time.perf_counter()
                stage = self._enter_stage(self.step + 1)
                with profiler.step(self.step + 1):
                    micro = [
                        reblock(next(batches), stage, self.stream.spec.eos_id) for _ in range(self.layout.grad_accum)
                    ]
                    data_wait = time.perf_counter() - start
                    lr = self.engine.lr()
                    loss, grad_norm = self.engine.train_step(micro)
                self.step += 1
                collected = collector.after_step(self.step)
                if collected is not None:
                    self.gc_ms = (self.gc_ms or 0.0) + collected
                self._check_finite(grad_norm)
                self.tokens_seen += self.layout.tokens_per_step
                self._note_passes()
                if self.saving is not None and self.saving.done_everywhere():
                    self._commit_save()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log(loss, grad_norm, lr, data_wait, time.perf_counter() - start, speed)
                else:
                    speed.update(time.perf_counter() - start, self.layout.tokens_per_step // self.info.world_size)
                if self.eval_sets and r.eval.every and self.step % r.eval.every == 0:
                    results, last_eval = self._evaluate(), self.step
                if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self._save(background=background)
                preemption.note_step(time.perf_counter() - start)
                if preemption.requested_on_any_rank():
                    self._save()
                    self.preempted = True
                    log.warning("preempted by %s: checkpoint at step %d committed %.1f s after the signal; exiting "
                                "with code %d so the job is requeued", preemption.received or "a peer's signal",
                                self.step, preemption.seconds_since_signal(), PREEMPTED_EXIT_CODE)  # fmt: skip
                    return results
        if self.eval_sets and last_eval != self.step:
            results = self._evaluate()
        self._commit_save()
        if t.save_final:
            self._save()
        final = self._export() if t.export_final else None
        self.callbacks.on_train_end(run, final)
        return results

    def _enter_stage(self, step: int) -> Stage:
        """The sequence-length stage of optimizer step ``step`` (from 1); on entering one, its MFU accounting and a
        log line (which says whether it begins here or the run resumes inside it)."""
        stage = stage_at(self.stages, step)
        if stage != self.stage:
            self.stage = stage
            self.flops_per_token = flops_per_token(self.config, stage.seq_len, self.n_params)
            if self.recipe.data.seq_len_stages:
                how = "begins" if step == stage.first_step else "continues"
                until = f"through step {stage.last_step}" if stage.last_step is not None else "to the end"
                log.info("step %d: sequence-length stage %d of %d %s (%s): seq_len %d, %d blocks per micro-batch x %d "
                         "micro-batches x %d data-parallel ranks, %s tokens per step", step, stage.index,
                         len(self.stages), how, until, stage.seq_len, stage.micro_batch_size, self.layout.grad_accum,
                         self.layout.data_parallel, f"{self.layout.tokens_per_step:,}")  # fmt: skip
        return stage

    def _note_passes(self) -> None:
        """Log the end of each pass on rank 0; the other ranks' readers end theirs within a few steps of it."""
        passes = self.stream.passes_completed() if self.info.is_main and self.stream is not None else None
        if passes is None:
            return
        if self.passes is not None and passes > self.passes:
            log.info("step %d: pass %d over the training data complete (rank 0's share; %s tokens trained)",
                     self.step, passes, f"{self.tokens_seen:,}")  # fmt: skip
        self.passes = passes

    def _check_finite(self, grad_norm: float) -> None:
        """Apply ``train.nonfinite`` to a step whose update the engine dropped (non-finite gradient norm)."""
        t = self.recipe.train
        if not self.engine.skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        self.skipped_steps += 1
        what = f"step {self.step}: the loss or gradient is not finite (global gradient norm {grad_norm})"
        if t.nonfinite == "stop" or self.skipped_in_a_row > t.max_skipped_steps:
            self._commit_save()  # of an earlier step, whose update was finite: the run stops, keep it
        kept = checkpoint.latest_checkpoint(self.out)
        kept_text = f"the last checkpoint, {kept}, is intact" if kept else "no checkpoint was saved yet"
        if t.nonfinite == "stop":
            raise TrainingStopped(f"{what}; stopping (train.nonfinite=stop); {kept_text}")
        if self.skipped_in_a_row > t.max_skipped_steps:
            raise TrainingStopped(f"{what}; {self.skipped_in_a_row} steps in a row skipped, more than "
                                  f"train.max_skipped_steps={t.max_skipped_steps}; stopping; {kept_text}")  # fmt: skip
        log.warning("%s; update skipped (%d in a row, %d in all)", what, self.skipped_in_a_row, self.skipped_steps)

    def _log(
        self, loss: torch.Tensor, grad_norm: float, lr: float, data_wait: float, step_time: float, speed: Throughput
    ):
        if dist.is_initialized():
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / self.info.world_size
        speed.update(step_time, self.layout.tokens_per_step // self.info.world_size)
        per_device = speed.tokens_per_s()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            log.warning("step %d: non-finite loss %s", self.step, loss_value)
        metrics: dict[str, Any] = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": per_device * self.info.world_size,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu(per_device, self.flops_per_token, self.peak),
            "tokens_seen": self.tokens_seen,
            "step_time": step_time,
            "data_wait": data_wait,
            "skipped_steps": self.skipped_steps,
            **memory_stats(self.info.device),
            **(self.stream.gather_metrics() if self.stream is not None else {}),
        }
        if self.stalled is not None:
            metrics["checkpoint_stall_s"], self.stalled = self.stalled, None
        if self.gc_ms is not None:
            metrics["gc_ms"], self.gc_ms = self.gc_ms, None
        if self.recipe.data.seq_len_stages and self.stage is not None:
            metrics["data/seq_len_stage"], metrics["data/seq_len"] = self.stage.index, self.stage.seq_len
        self.callbacks.on_step(self.step, metrics)

    def _evaluate(self) -> dict[str, dict[str, float]]:
        mb = self.recipe.eval.micro_batch_size or self.recipe.train.micro_batch_size
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        results = evaluate(self.engine, self.eval_sets, mb, pad)
        if self.info.is_main:
            table = ", ".join(f"{k}: loss {v['loss']:.4f} ppl {v['perplexity']:.3f}" for k, v in results.items())
            log.info("eval step %d: %s", self.step, table)
        self.callbacks.on_eval(self.step, results)
        return results

    def _save(self, *, background: bool = False) -> None:
        """Checkpoint this step, after committing the save in flight; with ``background`` the engine writes it while
        training goes on and a later step boundary commits it."""
        assert self.stream is not None
        self._commit_save()
        pending = checkpoint.start_save(
            self.engine, self.info, self.out, self.step, {"tokens_seen": self.tokens_seen}, self.stream.state_dict(),
            self.tokenizer, self.recipe.train.keep_last, background=background,
        )  # fmt: skip
        self.saving = pending
        if not background:
            self._commit_save()

    def _commit_save(self) -> None:
        """Commit the checkpoint in flight, if any, waiting for its write first. Collective."""
        pending, self.saving = self.saving, None
        if pending is not None:
            pending.commit()
            self.stalled = pending.stalled_s

    def _export(self) -> Path | None:
        """``final/``: the engine gathers the weights one decoder layer at a time (every rank takes part) and rank 0
        writes each shard as soon as it is complete, so no process holds the whole model."""
        tensors = self.engine.export_tensors()
        path = None
        try:
            if self.info.is_main:
                path = write_hf_model(tensors, self.config, self.tokenizer, self.out / "final", self.engine.dtype)
                log.info("Hugging Face model written to %s", path)
        finally:
            # the other ranks, and rank 0 after a failed write, still take part in every gather that is left
            for _ in tensors:
                pass
        if dist.is_initialized():
            dist.barrier()
        return path
