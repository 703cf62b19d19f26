"""The model card's "Command" is what the user ran (``cpt run``, ``cpt quickstart``, ``sbatch``), not the
``python -m launcher.train`` each worker was started with."""

from __future__ import annotations

from pathlib import Path

from launcher.callbacks.base import RunInfo
from launcher.callbacks.model_card import launch_command, render_model_card
from launcher.config import Recipe, SourceConfig

WORKER_ARGS = ["recipes/llama-1b-zero3.yaml", "train.max_steps=10"]


def test_the_command_of_the_outer_cpt_process_wins():
    env = {"CPT_COMMAND": "cpt run recipes/llama-1b-zero3.yaml train.max_steps=10"}
    assert launch_command(env, WORKER_ARGS) == "cpt run recipes/llama-1b-zero3.yaml train.max_steps=10"


def test_without_it_the_worker_command_line_without_the_launcher_local_rank():
    assert launch_command({}, ["r.yaml", "--local_rank=3", "output_dir=a b"]) == (
        "python -m launcher.train r.yaml 'output_dir=a b'"
    )
    assert launch_command({}, ["--local_rank", "3", "r.yaml"]) == "python -m launcher.train r.yaml"


def test_a_slurm_batch_job_shows_its_sbatch_command(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "pretrain.sbatch").write_text("#!/bin/bash\n")
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pretrain.sbatch", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    assert launch_command(env, WORKER_ARGS) == (
        f"# Slurm job 4242, submitted from {tmp_path}\n"
        "sbatch --nodes 4 slurm/pretrain.sbatch recipes/llama-1b-zero3.yaml train.max_steps=10"
    )
    # A job named otherwise (srun, --job-name) does not tell its batch command: the job and what the workers ran.
    named = {**env, "SLURM_JOB_NAME": "my-cpt"}
    assert launch_command(named, WORKER_ARGS) == (
        f"# Slurm job 4242, submitted from {tmp_path} (my-cpt); every worker ran:\n"
        "python -m launcher.train recipes/llama-1b-zero3.yaml train.max_steps=10"
    )
    # `cpt run` inside an allocation: the cpt command, with the job it ran in.
    inside = {**env, "CPT_COMMAND": "cpt run r.yaml"}
    assert launch_command(inside, WORKER_ARGS) == f"# Slurm job 4242, submitted from {tmp_path}\ncpt run r.yaml"


def test_the_card_shows_the_command_and_names_splits_only_for_hub_datasets(tmp_path):
    r = Recipe(output_dir=str(tmp_path / "run"))
    r.model.name_or_path = "org/base"
    r.data.train = [
        SourceConfig(path="org/web", name="cc", split="train", weight=3.0),
        SourceConfig(path=str(tmp_path / "domain.jsonl"), label="domain", holdout_documents=200),
    ]
    run = RunInfo(recipe=r, output_dir=Path(r.output_dir), world_size=2, grad_accum=1, global_batch_size=2,
                  tokens_per_step=4096, n_params=1000, start_step=0, max_steps=10, resumed=False,
                  command=launch_command({"CPT_COMMAND": "cpt quickstart"}, ["r.yaml"]))  # fmt: skip
    card = render_model_card(run, [], None)
    assert "## Command\n\n```bash\ncpt quickstart\n```" in card
    assert "launcher.train" not in card
    assert "`org/web` (cc) split train, weight 3 (75%)" in card
    local = f"`{tmp_path / 'domain.jsonl'}`, weight 1 (25%), first 200 documents held out as eval set domain"
    assert local in card
    assert "domain.jsonl` split" not in card
