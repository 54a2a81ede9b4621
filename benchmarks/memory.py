"""Per-GPU training memory of each stage of a config, estimated on the CPU.

    python benchmarks/memory.py --config torso-128                  # batch from the config
    python benchmarks/memory.py --config torso-256 --batch 1 --probe-grid 32,32,32
    python benchmarks/memory.py --config demo --stages tcss ldm --json out.json

Two parts per stage:

* **Model state, exact**: the stage's trainable modules are built from the config at full
  size and their parameters counted. Per parameter: fp32 weights 4 B + fp32 gradients 4 B +
  AdamW moments 8 B + EMA copy 4 B (modules with EMA) + DDP gradient buckets 4 B (world size
  > 1; Accelerate's default ``gradient_as_bucket_view=False``). bf16 autocast keeps fp32
  weights, so this part does not change with mixed precision.
* **Activations, measured small and scaled**: one forward of the stage's training loss at a
  small probe grid runs under ``torch.autograd.graph.saved_tensors_hooks``, which sees every
  tensor autograd keeps for the backward pass. Storages are counted once; parameters are not
  activations. The probe runs twice, the second time with the last axis doubled, and every
  saved tensor is classified by how its size grew: ×1 (constant: weight casts, text tokens),
  ×2 (linear in voxels: convolutions, norms, cross-attention) or ×4 (quadratic: the
  self-attention matrices, tokens² per head). Each class is then scaled to the target grid
  ((target voxels / probe voxels)^0, ^1 or ^2) and the per-sample classes by the batch size.
  With gradient checkpointing the hook sees only what lives between checkpointed blocks, so
  the inputs kept by the checkpointed calls are added, and the backward peak adds the largest
  single block's activations (recomputed one block at a time), taken from the run without
  checkpointing.

What the estimate leaves out: the backward pass's transient gradient buffers (a few tensors
of activation size; the ``+transient`` column adds twice the largest saved tensor), the CUDA
context (~0.5 GB) and allocator fragmentation (budget 10–20 %), the frozen text encoder
(MiniLM: 23 M parameters, 0.1 GB) and data-loader buffers. The bf16 columns run the probe
under CPU autocast, whose cast lists differ slightly from CUDA's. Both UNets build MONAI's
attention with ``use_flash_attention`` (torch's fused ``scaled_dot_product_attention``), which
keeps no (L, L) matrix for backward, so their quadratic class is empty; a model with the
explicit softmax(QKᵀ) path would show it there. Measure on the GPU itself (``torch.cuda.max_memory_allocated``) before a long run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from guidegen.config import GuideGenConfig, load_config  # noqa: E402
from guidegen.errors import GuideGenError  # noqa: E402
from guidegen.labels import LabelSet, load_label_set  # noqa: E402

GB = 1024**3
STAGES = ("tcss", "autoencoder", "ldm")
# bytes per parameter of the model state (see the module docstring)
WEIGHT_B, GRAD_B, ADAM_B, EMA_B, DDP_B = 4, 4, 8, 4, 4
TEXT_DIMS = {"minilm": 384}  # token width of the frozen encoders (the 'trainable' one: text.trainable_dim)


# ---------------------------------------------------------------------------- model state


def text_dim_of(cfg: GuideGenConfig) -> int:
    """Token width of the configured text encoder, without loading it (hf: its config.json)."""
    if cfg.text.encoder == "trainable":
        return cfg.text.trainable_dim
    if cfg.text.encoder == "hf":
        path = Path(cfg.text.hf_path or "") / "config.json"
        if not path.is_file():
            raise GuideGenError(f"text.hf_path: {path} not found (needed for the encoder width)")
        return int(json.loads(path.read_text())["hidden_size"])
    return TEXT_DIMS[cfg.text.encoder]


def ae_factor(cfg: GuideGenConfig) -> int:
    """Downsampling factor of the configured autoencoder (×2 between levels)."""
    return 2 ** (len(cfg.autoencoder.channels) - 1)


def build_stage(stage: str, cfg: GuideGenConfig, label_set: LabelSet, grid: tuple[int, int, int]) -> dict[str, nn.Module]:
    """The trainable modules of ``stage`` (as its StageTask builds them); ``grid`` sizes the AE discriminators."""
    tdim = text_dim_of(cfg)
    if stage == "tcss":
        from guidegen.training.tcss import build_tcss_model

        return {"model": build_tcss_model(cfg, label_set, tdim)}
    if stage == "autoencoder":
        from guidegen.models.autoencoder import AnatomyAwareAutoencoder
        from guidegen.training.ae_losses import AutoencoderLoss

        return {"model": AnatomyAwareAutoencoder.from_config(cfg.autoencoder, label_set.num_classes),
                "disc": AutoencoderLoss.from_config(cfg.autoencoder, grid)}
    from guidegen.training.ldm import build_ldm_model

    return {"model": build_ldm_model(cfg, label_set, tdim, cfg.autoencoder.latent_channels, ae_factor(cfg))}


def ema_modules(stage: str) -> tuple[str, ...]:
    return ("model",)  # every stage keeps an EMA of its network (not of the AE's discriminators)


@dataclass
class StateMemory:
    params: int  # all trainable parameters of the stage
    ema_params: int
    bytes_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_part.values())


def state_memory(modules: dict[str, nn.Module], ema: tuple[str, ...], world_size: int) -> StateMemory:
    """Exact bytes of weights, gradients, AdamW moments, EMA and DDP buckets per process."""
    count = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in modules.items()}
    n = sum(count.values())
    n_ema = sum(count[k] for k in ema if k in count)
    parts = {"weights": WEIGHT_B * n, "grads": GRAD_B * n, "adamw": ADAM_B * n, "ema": EMA_B * n_ema,
             "ddp_buckets": DDP_B * n if world_size > 1 else 0}
    return StateMemory(n, n_ema, parts)


# ---------------------------------------------------------------------------- activation probe


@dataclass
class Saved:
    """One tensor kept for backward: its bytes (0 if its storage was already counted) and where."""

    nbytes: int
    block: str  # top-level UNet/AE block it was saved in ('' outside the tracked blocks)


class SavedTensorProbe:
    """Records the tensors autograd saves (deduplicated by storage, parameters excluded)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.param_ptrs = {p.untyped_storage().data_ptr() for m in modules.values() for p in m.parameters()}
        self.param_ptrs |= {b.untyped_storage().data_ptr() for m in modules.values() for b in m.buffers()}
        self.seen: set[int] = set()
        self.records: list[Saved] = []
        self.block = ""

    def add(self, t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / opaque tensors: ignore
            return
        ptr = st.data_ptr()
        fresh = ptr not in self.seen and ptr not in self.param_ptrs and st.nbytes() > 0
        if fresh:
            self.seen.add(ptr)
        self.records.append(Saved(st.nbytes() if fresh else 0, self.block))

    def pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    def track_blocks(self, blocks: dict[str, nn.Module]) -> list:
        """Tag saved tensors with the top-level block that saved them (forward hooks)."""
        handles = []
        for name, mod in blocks.items():
            def pre(_m, _a, name=name):
                self.block = name

            def post(_m, _a, _o):
                self.block = ""

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return handles


def unet_blocks(unet) -> dict[str, nn.Module]:
    """The blocks a checkpointed forward wraps (MONAI DiffusionModelUNet)."""
    out = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    out["middle"] = unet.middle_block
    out.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    return out


@contextlib.contextmanager
def record_checkpoint_inputs(probe: SavedTensorProbe):
    """Count the tensors a non-reentrant ``checkpoint`` call keeps alive for its recompute."""
    from guidegen.models import unet_checkpoint

    original = unet_checkpoint.checkpoint

    def spy(fn, *args, **kw):
        for a in args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, Tensor) and t.requires_grad:
                    probe.add(t)
        return original(fn, *args, **kw)

    unet_checkpoint.checkpoint = spy  # the checkpointed forward shared by both UNets
    try:
        yield
    finally:
        unet_checkpoint.checkpoint = original


def _condition(cfg: GuideGenConfig, batch: int, device: torch.device) -> dict[str, Tensor]:
    from guidegen.text.prompts import FINDINGS_DIM

    g = torch.Generator().manual_seed(0)
    return {"tokens": torch.randn(batch, cfg.text.max_tokens, text_dim_of(cfg), generator=g).to(device),
            "mask": torch.ones(batch, cfg.text.max_tokens, dtype=torch.bool, device=device),
            "findings_vec": torch.randn(batch, FINDINGS_DIM, generator=g).to(device)}


def loss_on(stage: str, cfg: GuideGenConfig, label_set: LabelSet, modules: dict[str, nn.Module], grid: tuple[int, ...],
            device: torch.device | str = "cpu") -> Tensor:
    """The stage's training loss for one random sample on ``grid`` (the CT / label grid)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    k = label_set.num_classes
    labels = torch.randint(0, k, (1, *grid), generator=g).to(device)
    if stage == "tcss":
        from guidegen.diffusion import categorical as cat

        ab = cat.cosine_schedule(cfg.tcss.timesteps).to(device)
        t = torch.full((1,), cfg.tcss.timesteps // 2, dtype=torch.long, device=device)
        xt = cat.q_sample(labels, t, ab, k)
        c = _condition(cfg, 1, device)
        logits = modules["model"](cat.one_hot(xt, k), t, c["tokens"], c["mask"], c["findings_vec"])
        return cat.kl_loss(labels, xt, logits.float(), t, ab, aux_ce_weight=cfg.tcss.aux_ce_weight)
    if stage == "autoencoder":
        ae, loss_fn = modules["model"], modules["disc"]
        ct = (torch.rand(1, 1, *grid, generator=g) * 2 - 1).to(device)
        recon, posterior = ae(ct, labels, sample=True)
        # past disc_start: the generator pass also runs both discriminators (the larger step)
        out = loss_fn.generator_loss(recon.float(), ct, posterior, cfg.autoencoder.disc_start + 1,
                                     last_layer=ae.last_layer_weight)
        return out["loss"]
    f = ae_factor(cfg)
    z = torch.randn(1, cfg.autoencoder.latent_channels, *(n // f for n in grid), generator=g).to(device)
    c = _condition(cfg, 1, device)
    t = torch.full((1,), cfg.ldm.timesteps // 2, dtype=torch.long, device=device)
    pred = modules["model"](z, t, labels, c["tokens"], c["mask"], c["findings_vec"])
    return nn.functional.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))


def probe_run(stage: str, cfg: GuideGenConfig, label_set: LabelSet, grid: tuple[int, int, int], target_grid: tuple[int, int, int],
              bf16: bool) -> list[Saved]:
    """Saved tensors of one forward (+ backward, to check it runs) at ``grid``."""
    torch.manual_seed(0)
    modules = build_stage(stage, cfg, label_set, target_grid)
    for m in modules.values():
        m.train()
    probe = SavedTensorProbe(modules)
    net = modules["model"]
    unet = getattr(getattr(net, "net", None), "unet", None)
    handles = probe.track_blocks(unet_blocks(unet)) if unet is not None else []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    try:
        with record_checkpoint_inputs(probe), torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t), amp:
            loss = loss_on(stage, cfg, label_set, modules, grid)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return probe.records


@dataclass
class Activations:
    """Activation bytes at the target grid, per class: const (once), linear and quadratic (per sample)."""

    const: float
    linear: float
    quadratic: float
    largest: float  # largest single saved tensor (per sample)
    blocks: dict[str, float]  # per tracked block (per sample)
    misfit: int  # tensors whose growth was not ×1/×2/×4 (counted as linear)

    def total(self, batch: int) -> float:
        return self.const + batch * (self.linear + self.quadratic)


def classify(small: list[Saved], big: list[Saved], scale: float) -> Activations:
    """Match the two probe runs tensor by tensor and scale each growth class by ``scale`` = target/probe voxels."""
    if len(small) != len(big):
        raise RuntimeError(f"the two probe runs saved different tensor counts ({len(small)} vs {len(big)}); "
                           "the graph depends on the grid size")
    const = lin = quad = largest = 0.0
    blocks: dict[str, float] = {}
    misfit = 0
    for a, b in zip(small, big):
        if a.nbytes == 0 and b.nbytes == 0:
            continue
        ratio = b.nbytes / max(a.nbytes, 1)
        power = round(math.log2(ratio)) if ratio > 0 else 1
        # convolutions without padding (SSIM windows, PatchGAN heads) grow a little more than
        # ×2 (n-6 → 2n-6 voxels); only a growth far from ×1/×2/×4 is reported
        if power not in (0, 1, 2) or abs(ratio - 2**power) > 0.25 * 2**power:
            misfit += 1
            power = 1
        size = a.nbytes * scale**power
        if power == 0:
            const += size
        else:
            lin += size if power == 1 else 0.0
            quad += size if power == 2 else 0.0
            largest = max(largest, size)
            if a.block:
                blocks[a.block] = blocks.get(a.block, 0.0) + size
    return Activations(const, lin, quad, largest, blocks, misfit)


def stage_grid(stage: str, cfg: GuideGenConfig) -> tuple[int, int, int]:
    """The grid a training sample of ``stage`` has (the AE trains on crops)."""
    if stage == "autoencoder" and cfg.autoencoder.train_crop is not None:
        return tuple(cfg.autoencoder.train_crop)  # type: ignore[return-value]
    return tuple(cfg.data.grid)  # type: ignore[return-value]


def min_multiple(stage: str, cfg: GuideGenConfig) -> int:
    """Every probe axis must divide by this (the network's total downsampling)."""
    if stage == "tcss":
        return cfg.tcss.patch_size * 2 ** (len(cfg.tcss.channels) - 1)
    if stage == "autoencoder":  # the PatchGAN discriminators need >= 4 voxels after their strides
        from guidegen.training.ae_losses import disc_layers_for

        return max(ae_factor(cfg), 4 * 2 ** disc_layers_for(stage_grid(stage, cfg)))
    return ae_factor(cfg) * 2 ** (len(cfg.ldm.channels) - 1)


def with_train(cfg: GuideGenConfig, stage: str, gc: bool) -> GuideGenConfig:
    c = cfg.model_copy(deep=True)
    getattr(c, stage).train.gradient_checkpointing = gc
    return c


def estimate_activations(stage: str, cfg: GuideGenConfig, label_set: LabelSet, probe: tuple[int, int, int],
                         bf16: bool, gc: bool, no_gc: Activations | None = None) -> Activations:
    """Activation bytes at the stage's training grid (see the module docstring for the method)."""
    m = min_multiple(stage, cfg)
    grid = tuple(max(m, int(math.ceil(n / m)) * m) for n in probe)
    big = (*grid[:2], 2 * grid[2])
    target = stage_grid(stage, cfg)
    scale = math.prod(target) / math.prod(grid)
    c = with_train(cfg, stage, gc)
    acts = classify(probe_run(stage, c, label_set, grid, target, bf16), probe_run(stage, c, label_set, big, target, bf16), scale)
    if gc and no_gc is not None and no_gc.blocks:
        # backward recomputes one checkpointed block at a time: its full activations on top
        acts.linear += max(no_gc.blocks.values())
    return acts


# ---------------------------------------------------------------------------- report


def supports_checkpointing(stage: str) -> bool:
    return stage in ("tcss", "ldm")  # the autoencoder has no checkpointed forward


def estimate_stage(stage: str, cfg: GuideGenConfig, label_set: LabelSet, probe: tuple[int, int, int], batch: int | None,
                   world_size: int) -> dict:
    """Rows (fp32 / bf16 × without / with checkpointing) of one stage's per-GPU memory estimate."""
    target = stage_grid(stage, cfg)
    state = state_memory(build_stage(stage, cfg, label_set, target), ema_modules(stage), world_size)
    b = batch or getattr(cfg, stage).train.batch_size
    rows = []
    for bf16 in (False, True):
        plain = estimate_activations(stage, cfg, label_set, probe, bf16, gc=False)
        variants = [(False, plain)]
        if supports_checkpointing(stage):
            variants.append((True, estimate_activations(stage, cfg, label_set, probe, bf16, gc=True, no_gc=plain)))
        for gc, acts in variants:
            act = acts.total(b)
            transient = 2 * b * acts.largest
            rows.append({"precision": "bf16" if bf16 else "fp32", "checkpointing": gc, "activations_gb": act / GB,
                         "attention_gb": b * acts.quadratic / GB, "total_gb": (state.total + act) / GB,
                         "total_with_transient_gb": (state.total + act + transient) / GB, "misfit_tensors": acts.misfit})
    return {"stage": stage, "grid": list(target), "batch": b, "params_m": state.params / 1e6,
            "state_gb": state.total / GB, "state_parts_gb": {k: v / GB for k, v in state.bytes_by_part.items()}, "rows": rows}


def print_table(cfg_name: str, results: list[dict], world_size: int, probe: tuple[int, int, int]) -> None:
    print(f"config {cfg_name}: estimated training memory per GPU ({world_size} process(es); probe grid {list(probe)})")
    for r in results:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["state_parts_gb"].items() if v)
        print(f"\n{r['stage']}: grid {r['grid']}, batch {r['batch']}/GPU, {r['params_m']:.1f} M params; "
              f"model state {r['state_gb']:.2f} GB ({parts})")
        print(f"  {'precision':<9} {'checkpoint':<10} {'activ. GB':>10} {'(attn GB)':>10} {'total GB':>9} {'+transient':>11}")
        for row in r["rows"]:
            print(f"  {row['precision']:<9} {'on' if row['checkpointing'] else 'off':<10} {row['activations_gb']:>10.2f} "
                  f"{row['attention_gb']:>10.2f} {row['total_gb']:>9.2f} {row['total_with_transient_gb']:>11.2f}"
                  + (f"  ({row['misfit_tensors']} tensors scaled as linear)" if row["misfit_tensors"] else ""))
        if not supports_checkpointing(r["stage"]):
            print("  (no gradient checkpointing in this network)")


def parse_probe(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 1:
        raise SystemExit(f"--probe-grid: expected S or X,Y,Z, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo", help="preset name or YAML path")
    ap.add_argument("--batch", type=int, default=None, help="samples per GPU (default: each stage's train.batch_size)")
    ap.add_argument("--probe-grid", default="32,32,32", help="small grid of the activation probe (rounded up to the "
                                                            "network's downsampling multiple)")
    ap.add_argument("--world-size", type=int, default=8, help="number of GPUs (adds DDP buckets when > 1)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    label_set = load_label_set(cfg.data.label_set)
    probe = parse_probe(args.probe_grid)
    results = [estimate_stage(s, cfg, label_set, probe, args.batch, args.world_size) for s in args.stages]
    print_table(cfg.name, results, args.world_size, probe)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.name, "world_size": args.world_size, "probe_grid": list(probe),
                                         "stages": results}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except GuideGenError as exc:
        raise SystemExit(f"error: {exc}")
