"""Loss parity on GPUs in bf16, where the CPU suite (fp32, no compiled kernels) cannot look: FSDP2 against DeepSpeed
ZeRO-3; CPU offload of each engine against the same engine without it, with the GPU memory it frees; compiled
decoder layers and the fused loss against eager layers and the model's own logits; float8 training (torchao)
against bf16. Each comparison is one recipe run twice on this machine, the runs differing only in the setting under
test; the tolerance comes from how far bf16's rounding moves the same curve (see :func:`bf16_bound`)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import cpt, read_metrics, tiny_recipe, train_losses, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16, offload, compiled kernels and float8 on a card"
    ),
]

# the test helpers run workers with DeepSpeed's CPU accelerator; here DeepSpeed runs on the card
CUDA = {"DS_ACCELERATOR": "cuda"}
GIB = float(2**30)
STEPS = 10

# The tiny model's recipe under each setting: (engine, engine config, train.* values besides the common ones).
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "fsdp": ("fsdp", "fsdp.yaml", {}),
    "fsdp-fp32": ("fsdp", "fsdp.yaml", {"precision": "fp32"}),
    "zero3": ("deepspeed", "zero3.json", {}),
    "fsdp-offload": ("fsdp", "fsdp-offload.yaml", {}),
    "zero3-offload": ("deepspeed", "zero3-offload.json", {}),
    "fsdp-compile": ("fsdp", "fsdp.yaml", {"compile": True}),
    "zero3-compile": ("deepspeed", "zero3.json", {"compile": True}),
    "fsdp-unfused": ("fsdp", "fsdp.yaml", {"fused_loss": False}),
    "zero3-unfused": ("deepspeed", "zero3.json", {"fused_loss": False}),
    # parallel.sequence_parallel: 2 (a name ending in -sp2), compiled layers: each sequence split over the 2 GPUs
    "fsdp-compile-sp2": ("fsdp", "fsdp.yaml", {"compile": True}),
    "zero3-compile-sp2": ("deepspeed", "zero3.json", {"compile": True}),
}


def gpus() -> int:
    """Two ranks where there are two GPUs (the gradient reduction then runs through NCCL); one otherwise."""
    return min(2, torch.cuda.device_count())


def run_cache(root: Path, recipe_for: Callable[[str, Path], dict]) -> Callable[[str], tuple[Path, str]]:
    """Runs made on first request and kept for the module: name -> (output_dir, the run's log). A test asks only
    for the runs it compares, so each test can run alone."""
    done: dict[str, tuple[Path, str]] = {}

    def get(name: str) -> tuple[Path, str]:
        if name not in done:
            out = root / name
            p = cpt("run", str(write_recipe(root / f"{name}.yaml", recipe_for(name, out))), **CUDA)
            done[name] = (out, p.stderr)
        return done[name]

    return get


@pytest.fixture(scope="module")
def tiny_runs(assets, tmp_path_factory) -> Callable[[str], tuple[Path, str]]:
    """The tiny model for STEPS steps under each of VARIANTS: bf16 unless the variant says otherwise, global batch 8
    in micro-batches of 2 (gradient accumulation 2 on two GPUs, 4 on one), evaluation on both eval sets at the end."""

    def recipe(name: str, out: Path) -> dict:
        engine, config, train = VARIANTS[name]
        return tiny_recipe(
            assets, out,
            train={"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "log_every": 1,
                   "precision": "bf16", **train},
            parallel={"engine": engine, "config": config, "nproc_per_node": gpus(),
                      "sequence_parallel": 2 if name.endswith("-sp2") else 1},
        )  # fmt: skip

    return run_cache(tmp_path_factory.mktemp("gpu-parity"), recipe)


def bf16_bound(runs: Callable[[str], tuple[Path, str]]) -> float:
    """How far two correct bf16 runs of one recipe may be apart, from how far bf16 moves this very curve.

    D is the largest gap, over the steps, between FSDP2 in bf16 and FSDP2 in fp32 (a real fp32: torch leaves TF32
    off for matmuls and the launcher does not turn it on): the effect of every bf16 rounding (weights cast for
    compute, activations, gradients) on these losses. Two bf16 runs that differ in how they round (another
    engine, fused kernels, another optimizer implementation) are each about D from the fp32 curve, so by the
    triangle inequality at most 2D apart; the bound is 3D, since DeepSpeed rounds in more places than FSDP2 (its
    fp32 master weights start from the bf16 model, its gradients and their reduction are bf16 where FSDP2
    reduces in fp32). The bound is only worth something if it is small next to
    what training does to the loss: a broken run (an update lost, a learning rate off, a weight not gathered)
    moves the loss by a share of that, so D must be below a sixth of the loss drop over the run."""
    bf16, fp32 = train_losses(runs("fsdp")[0]), train_losses(runs("fsdp-fp32")[0])
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1)), (bf16, fp32)
    spread = max(abs(bf16[s] - fp32[s]) for s in bf16)
    assert spread > 0, "train.precision=bf16 gave the fp32 losses exactly: bf16 did not take effect"
    drop = fp32[1] - fp32[STEPS]
    assert 3 * spread < drop / 2, (
        f"bf16 moved the loss by up to {spread:.4g} while training lowered it by {drop:.4g}: a bound of 3x that "
        f"would not tell a broken run from a working one (bf16 {bf16}, fp32 {fp32})"
    )
    return 3 * spread


def assert_same_losses(out: Path, ref: Path, bound: float, what: str) -> None:
    """Every step's training loss and the final eval loss of each set within ``bound`` of the reference run's."""
    a, b = train_losses(ref), train_losses(out)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1)), (what, sorted(a), sorted(b))
    assert all(math.isfinite(v) for v in b.values()), (what, b)
    gap = max(abs(b[s] - a[s]) for s in a)
    table = ", ".join(f"{s}: {b[s]:.5f} vs {a[s]:.5f}" for s in a)
    assert gap <= bound, f"{what}: losses up to {gap:.4g} apart (bound {bound:.4g}); {table}"
    ea = json.loads((ref / "eval_results.json").read_text())
    eb = json.loads((out / "eval_results.json").read_text())
    assert ea.keys() == eb.keys() == {"code", "prose"}, (ea, eb)
    for name in ea:
        assert eb[name]["tokens"] == ea[name]["tokens"] > 0, (what, name)
        assert abs(eb[name]["loss"] - ea[name]["loss"]) <= bound, (what, name, eb[name], ea[name], bound)


def last_step(out: Path) -> dict:
    return [m for m in read_metrics(out) if "loss" in m][-1]


def parameter_count(model_dir: Path) -> int:
    """Parameters of a saved model, each stored tensor once (tied embeddings are one tensor, as in the engines)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (not a dict)
    return total


# -------------------------------------------------------------------------------------------------- engines


def test_fsdp2_and_zero3_give_the_same_bf16_losses(tiny_runs):
    """The same weights, data and AdamW settings through FSDP2's mixed precision (fp32 shards, bf16 compute, fp32
    gradient reduction) and DeepSpeed's bf16 (bf16 parameters and gradients, fp32 master weights in the
    optimizer), on the GPUs with NCCL: DeepSpeed's bf16 optimizer and FSDP2's MixedPrecisionPolicy only run here."""
    bound = bf16_bound(tiny_runs)
    assert_same_losses(tiny_runs("zero3")[0], tiny_runs("fsdp")[0], bound, "ZeRO-3 against FSDP2")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: one sequence split over two under NCCL")
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sequence_parallel_keeps_the_bf16_losses(tiny_runs, engine):
    """Each sequence split over the 2 GPUs (attention's all-to-alls through NCCL, inside compiled layers) against the
    2 GPUs reading different sequences, at the same global batch: the same curve within bf16's bound."""
    bound = bf16_bound(tiny_runs)
    out, log = tiny_runs(f"{engine}-compile-sp2")
    assert "sequence parallel: part 1 of 2" in log
    assert_same_losses(out, tiny_runs(f"{engine}-compile")[0], bound, f"{engine}: sequence parallel 2")


# -------------------------------------------------------------------------------------------------- offload


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_cpu_offload_frees_gpu_memory_and_keeps_the_losses(tiny_runs, assets, engine):
    """fsdp-offload.yaml (CPUOffloadPolicy) and zero3-offload.json (offload_optimizer and offload_param to the
    CPU, DeepSpeedCPUAdam) in bf16 against the same engine without offload. tests/test_gpu_fsdp_offload.py looks
    inside FSDP2's fp32 offload from a callback; this is bf16 training as a user runs it, both engines, judged
    by what the run logs itself (metrics.jsonl's torch.cuda memory statistics, rank 0)."""
    plain, _ = tiny_runs(engine)
    offloaded, _ = tiny_runs(f"{engine}-offload")
    on, off = last_step(plain), last_step(offloaded)
    assert off["mem_peak_gib"] > 0, "the offloaded run did not compute on the GPU"
    # Between steps the GPU holds the model states. Both engines shard AdamW's states over the ranks, and offload
    # keeps this rank's share in host memory: at least its two fp32 moments, 8 bytes a parameter over the ranks
    # (the fp32 weights, and DeepSpeed's bf16 partitions, leave too).
    freed = (on["mem_allocated_gib"] - off["mem_allocated_gib"]) * GIB
    adam = 8 * parameter_count(assets["base"]) / gpus()
    assert freed >= adam, (
        f"{engine}: offload freed {freed / 2**20:.3f} MiB of GPU memory between steps, less than the "
        f"{adam / 2**20:.3f} MiB of Adam's moments (without offload {on['mem_allocated_gib']:.6f} GiB, with "
        f"{off['mem_allocated_gib']:.6f} GiB)"
    )
    assert_same_losses(offloaded, plain, bf16_bound(tiny_runs), f"{engine} with CPU offload against without")


# ------------------------------------------------------------------------------------ compile and fused loss


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
@pytest.mark.parametrize("option", ["compile", "unfused"])
def test_compiled_layers_and_the_fused_loss_keep_the_losses(tiny_runs, engine, option):
    """``train.compile: true`` (Inductor's fused bf16 kernels for each decoder layer, with each engine's hooks
    outside them) against eager layers, and ``train.fused_loss: false`` (the model's own bf16 logits) against the
    default fused output projection + cross-entropy; the CPU suite runs neither Inductor's GPU kernels nor bf16.
    Both change only where bf16 rounds, so the runs stay within the bf16 bound."""
    out, log = tiny_runs(f"{engine}-{option}")
    applied = "'compiled': True" if option == "compile" else "'fused_loss': False"
    assert applied in log, f"the run's 'model options' line does not show {applied}"
    assert_same_losses(out, tiny_runs(engine)[0], bf16_bound(tiny_runs), f"{engine} {option} against the default")


# ------------------------------------------------------------------------------------------------------ float8


def float8_missing() -> str | None:
    """Why float8 training cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: float8 training on a card"
    if importlib.util.find_spec("torchao") is None:
        return "float8 training needs torchao (not importable here)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"float8 matmuls need compute capability 8.9 or newer; this GPU has {major}.{minor}"
    return None


needs_float8 = pytest.mark.skipif(float8_missing() is not None, reason=str(float8_missing()))
FLOAT8_MODES = ["rowwise", "tensorwise"]
FLOAT8_STEPS = 50
LAST = 10  # the steps whose mean loss the float8 parity compares


@pytest.fixture(scope="module")
def float8_model(assets, tmp_path_factory) -> Path:
    """A Llama whose every linear layer float8 can take (each dimension a multiple of 16): hidden 256, FFN 768,
    4 layers, 4 heads of 64, 2 KV heads, the assets tokenizer's vocabulary; saved once, so that every run starts
    from the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.quickstart_assets import build_base_config

    root = tmp_path_factory.mktemp("float8-model")
    config = build_base_config(root / "config", assets["tokenizer"], hidden_size=256, num_layers=4, num_heads=4,
                               num_kv_heads=2, intermediate_size=768, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    model.save_pretrained(root / "model")
    for f in config.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (root / "model" / f.name).write_bytes(f.read_bytes())
    return root / "model"


def float8_recipe(assets, model: Path, out: Path, mode: str | None, **train) -> dict:
    """FSDP2 in bf16 on the float8 model, micro-batches of 8 x 64 tokens (the token dimension of every matmul a
    multiple of 16); ``mode`` None leaves ``train.float8`` at its default."""
    return tiny_recipe(
        assets, out, model={"name_or_path": str(model)}, eval={"sets": {}},
        train={"micro_batch_size": 8, "log_every": 1, "precision": "bf16", "lr": 1e-3, "warmup_steps": 5,
               **({"float8": mode} if mode else {}), **train},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": gpus()},
    )  # fmt: skip


@pytest.fixture(scope="module")
def float8_runs(assets, float8_model, tmp_path_factory) -> Callable[[str], tuple[Path, str]]:
    """FLOAT8_STEPS steps of the float8 model in bf16 ("bf16") and under each float8 mode, nothing saved."""

    def recipe(name: str, out: Path) -> dict:
        mode = None if name == "bf16" else name
        return float8_recipe(assets, float8_model, out, mode, max_steps=FLOAT8_STEPS, save_final=False,
                             export_final=False)  # fmt: skip

    return run_cache(tmp_path_factory.mktemp("float8-parity"), recipe)


@needs_float8
@pytest.mark.parametrize("mode", FLOAT8_MODES)
def test_float8_trains_saves_its_own_dtype_and_resumes(assets, float8_model, tmp_path, mode):
    """30 steps under ``train.float8``: finite losses that fall; the checkpoint and ``final/`` hold the model's
    own dtypes (float8 is how the matmuls run, not what is stored), under the base model's tensor names; the
    same command with more steps resumes from the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", float8_recipe(assets, float8_model, out, mode, max_steps=30,
                                                             save_every=10))  # fmt: skip
    cpt("run", str(recipe), **CUDA)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31)), losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first, f"the loss did not fall under float8 {mode}: {losses}"

    stored = {torch.float32, torch.bfloat16}
    final = {k: v for f in (out / "final").glob("*.safetensors") for k, v in load_file(f).items()}
    base = {k: v for f in float8_model.glob("*.safetensors") for k, v in load_file(f).items()}
    assert final.keys() == base.keys(), sorted(final.keys() ^ base.keys())
    assert {v.dtype for v in final.values()} <= stored, {k: v.dtype for k, v in final.items() if v.dtype not in stored}
    ckpt = out / "checkpoints" / "step-30"
    assert json.loads((ckpt / "trainer_state.json").read_text())["dtype"] == "bfloat16"
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    weights = {k: m.properties.dtype for k, m in saved.items() if k.startswith("model.") and hasattr(m, "properties")}
    assert weights and set(weights.values()) <= stored, weights

    p = cpt("run", str(recipe), "train.max_steps=34", **CUDA)
    assert f"resumed from {ckpt} at step 30" in p.stderr
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 35)), losses
    assert all(math.isfinite(losses[s]) for s in range(31, 35)), losses


@needs_float8
@pytest.mark.parametrize("mode", FLOAT8_MODES)
def test_float8_follows_the_bf16_loss_curve(float8_runs, mode):
    """Same weights, data and schedule in bf16 and under ``train.float8``; the mean loss of the last LAST steps
    of FLOAT8_STEPS.

    Bound, 5% of the bf16 mean: float8 e4m3 keeps 3 mantissa bits to bf16's 7, so each matmul input is rounded 16
    times more coarsely (up to 6% of a value). Published float8 runs (torchao's and torchtitan's, Llama 3 models
    over thousands of steps) track bf16 within about 1%, measured where the curve is nearly flat, so being a few steps
    behind costs little. Here the curve still falls steeply at step 40-50, so the same slowing costs several
    times more, and a 4-layer model has little depth to average the rounding out; both runs read the same
    batches, so data noise does not count against it. A float8 run that does not learn (a gradient lost in the
    float8 layers, a scale applied twice) stays far above the curve: the bound is required to be under half
    of what the bf16 run's loss fell by, so that half the learning fails the test."""
    bf16 = train_losses(float8_runs("bf16")[0])
    f8 = train_losses(float8_runs(mode)[0])
    steps = list(range(1, FLOAT8_STEPS + 1))
    assert sorted(bf16) == sorted(f8) == steps, (sorted(bf16), sorted(f8))
    assert all(math.isfinite(v) for v in f8.values()), f8
    # Both start from the same weights on the same batch, and a forward pass is deterministic: a float8 run whose
    # first loss is bf16's did not run its matmuls in float8.
    assert f8[1] != bf16[1], f"train.float8={mode} gave bf16's first loss exactly: float8 did not take effect"
    tail = steps[-LAST:]
    ref, got = sum(bf16[s] for s in tail) / LAST, sum(f8[s] for s in tail) / LAST
    bound = 0.05 * ref
    drop = bf16[1] - ref
    assert bound < drop / 2, f"bf16 fell only {drop:.4g} ({bf16[1]:.4g} -> {ref:.4g}): the 5% bound would not tell"
    assert abs(got - ref) <= bound, (
        f"float8 {mode}: mean loss of steps {tail[0]}-{tail[-1]} {got:.4f} against bf16's {ref:.4f} (bound "
        f"{bound:.4f}); float8 {[round(f8[s], 4) for s in steps]}, bf16 {[round(bf16[s], 4) for s in steps]}"
    )
