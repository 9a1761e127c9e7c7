"""The plan of a run: the planner's for a new run, another member's for a leftover-budget member, and
what ``--init-from`` pins."""

from __future__ import annotations

from typing import Any

from medclf import threads as threads_mod
from medclf.budget import MIN_RUN_S, Budget, decode_seconds
from medclf.data.samples import SampleSet
from medclf.distributed import DistContext
from medclf.errors import ConfigError
from medclf.planner import Fingerprint, Plan, choose_size_and_epochs, initial_plan
from medclf.training.config import TrainConfig


def new_plan(
    samples: SampleSet,
    fp: Fingerprint,
    n_train: int,
    cfg: TrainConfig,
    budget: Budget,
    probe_s: float,
    policy: threads_mod.ThreadPolicy,
    dist: DistContext,
    device: str,
) -> Plan:
    """The planner's plan for a new run: rules, then a timing probe bounded by a share of the budget."""
    overrides = cfg.overrides()
    source = _transfer_source(cfg, overrides, fp)
    plan = initial_plan(fp, n_train, overrides, world_size=dist.world_size, device=device)
    if cfg.size is not None and cfg.size < 4:
        raise ConfigError("--size must be at least 4")
    workers = cfg.workers or policy.decode_workers
    decode_estimate = decode_seconds(probe_s, len(samples), workers)
    planning_s = budget.planning_seconds()
    # Decoding and the probe's own time come off what the epochs may take.
    budget_left = budget.plan_epoch_seconds(before=decode_estimate + planning_s)
    if budget_left <= 0 and not cfg.epochs:
        raise ConfigError(
            f"the time budget ({cfg.time_budget:.0f} s) is spent on reading the data alone "
            f"(about {decode_estimate:.0f} s); give a larger --time-budget"
        )
    if dist.is_main:  # the others take rank 0's plan: one timing, one plan
        plan = choose_size_and_epochs(
            plan,
            n_train=n_train,
            budget_s=max(budget_left, MIN_RUN_S),
            fp=fp,
            overrides=overrides,
            device=device,
            world_size=dist.world_size,
            planning_s=planning_s,
        )
    if source is not None:
        _apply_transfer(plan, source, cfg, len(samples.classes), n_train)
        if plan.linear_probe and dist.world_size > 1:
            # DDP reduces the gradients of the parameters that required them when it was built: a backbone
            # that starts frozen and thaws later is not supported under torchrun yet.
            if cfg.linear_probe:
                raise ConfigError("--linear-probe is not supported with several processes (torchrun) yet")
            plan.linear_probe, plan.backbone_lr = 0.0, 1.0
            plan.reasons.append("several processes: no linear probe (not supported under torchrun yet)")
    return plan


def plan_like(base: Plan, cfg: TrainConfig, budget: Budget) -> Plan:
    """``base`` (another member's plan) for this run: the same preprocessing, network and recipe, and the
    epochs that fit this budget at the pace ``base`` measured (at most its own epochs)."""
    plan = Plan.from_dict(base.to_dict())
    plan.reasons = [f"the plan of the first member ({base.arch}, input {list(base.spec.input_shape)})"]
    if cfg.epochs:
        plan.epochs = int(cfg.epochs)
    elif plan.epoch_seconds:
        fit = int(budget.plan_epoch_seconds() // plan.epoch_seconds)
        plan.epochs = int(max(1, min(base.epochs, fit)))
    return plan


def _transfer_source(cfg: TrainConfig, overrides: dict[str, Any], fp: Fingerprint) -> Any:
    """For ``--init-from``: load (and verify) the source bundle and pin the settings its weights need."""
    if not cfg.init_from:
        if cfg.freeze:
            raise ConfigError("--freeze needs --init-from: there is nothing to keep frozen in a new network")
        if cfg.linear_probe:
            raise ConfigError("--linear-probe needs --init-from: a new network has no features to probe")
        return None
    from medclf.training.transfer import open_source

    source = open_source(cfg.init_from)
    if source.kind == "state_dict":  # weights alone: --arch names the network, the planner the rest
        if not overrides.get("arch"):
            raise ConfigError(
                f"--init-from {source.path}: a plain state dict needs --arch (see `medclf models`)"
            )
        overrides.setdefault("lr", 5e-4)
        return source
    assert source.spec is not None
    if source.spec.spatial_dims != fp.spatial_dims:
        raise ConfigError(
            f"--init-from: the bundle takes {source.spec.spatial_dims}D input, the data is {fp.spatial_dims}D"
        )
    if overrides.get("normalise") not in (None, "auto"):  # the weights were trained on the source's scaling
        raise ConfigError(
            "--init-from keeps the source bundle's intensity scaling "
            f"({source.spec.normalise}{'' if source.spec.window is None else f' {list(source.spec.window)}'}); "
            "leave --normalise out"
        )
    denoise = overrides.get("denoise")
    if denoise not in (None, source.spec.denoise):  # so were they on its denoising
        raise ConfigError(
            f"--init-from keeps the source bundle's denoising ({source.spec.denoise}); leave --denoise out"
        )
    pinned = {"arch": source.arch, "size": int(source.spec.size[0])}
    for key, value in pinned.items():
        if overrides.get(key) not in (None, value):
            raise ConfigError(
                f"--init-from fixes --{key} to the source bundle's ({value}); leave --{key} out"
            )
        overrides[key] = value
    # Fine-tuning starts from a trained network: a smaller peak learning rate keeps what it learned.
    overrides.setdefault("lr", 5e-4)
    return source


def _apply_transfer(plan: Plan, source: Any, cfg: TrainConfig, n_outputs: int, n_train: int) -> None:
    from medclf.models.registry import model_info

    if source.kind == "state_dict":
        from medclf.training.transfer import check_state_dict

        check_state_dict(source, plan, n_outputs)  # refused here, before any data is decoded
    else:
        plan.spec = source.spec  # the same preprocessing as the weights were trained with
        plan.arch_kwargs = dict(source.arch_kwargs)
    plan.init_from = {
        "path": str(source.path),
        "sha256": source.sha256,
        "classes": list(source.classes),
        "kind": source.kind,
    }
    groups = model_info(plan.arch).layer_groups
    names = cfg.freeze.split(",") if isinstance(cfg.freeze, str) else list(cfg.freeze or [])
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ConfigError(
            f"--freeze: unknown layer group(s) {', '.join(unknown)}; {plan.arch} has {', '.join(groups)}"
        )
    plan.freeze = names
    from medclf.training.probe import plan_probe

    plan.linear_probe, plan.backbone_lr, why = plan_probe(cfg.linear_probe, n_train, source.kind)
    if why:
        plan.reasons.append(why)
    plan.reasons.append(
        f"fine-tuning from {source.kind.replace('_', ' ')} {source.path} ({source.sha256[:12]}); "
        f"frozen: {', '.join(names) or 'nothing'}"
    )
