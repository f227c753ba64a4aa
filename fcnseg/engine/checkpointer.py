"""A run's checkpoints: writing them, choosing the one to resume from, putting its state back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.engine.runtime import seed_everything
from fcnseg.engine.step import NonFiniteLossError
from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import (
    error_summary,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fcnseg.utils.distributed import all_gather_object, max_restarts, on_main, restart_count

# best.pt is for evaluation, prediction and staged training (model.init_from): the weights and
# what they were trained with. The optimizer state (as large again as the weights with SGD
# momentum, twice with Adam) stays in last.pt, from which a run continues.
BEST_KEYS = ("model", "model_description", "config", "iteration", "best_miou", "weights")


def write_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Writes a training ``state`` (``Trainer.state_dict``) to ``path`` from rank 0.

    Every process must call it: each one's random generator states go into the file. Weights
    that are not finite are never written (the previous file stays); ``best.pt`` gets the
    ``BEST_KEYS`` only.
    """
    finite = [t.isfinite().all() for t in state["model"].values() if t.is_floating_point()]
    if finite and not bool(torch.stack(finite).all()):
        raise NonFiniteLossError(
            f"the weights are not finite at iteration {state['iteration']}; {path} was left as "
            f"it was"
        )
    state = {**state, "rng": all_gather_object(rng_state())}
    if path.name == "best.pt":
        state = {key: state[key] for key in BEST_KEYS if key in state}
    on_main(lambda: save_checkpoint(state, path))
    return path


def resume_path(last: Path, resume: bool | str) -> Path | None:
    """The checkpoint that ``trainer.resume`` names, or ``None`` to start a new run.

    Args:
        last: the run directory's ``checkpoints/last.pt``.
        resume: ``True`` (``last``, which must exist), ``"auto"`` (``last`` when it exists:
            for jobs that a scheduler requeues with the same command) or a checkpoint path.
    """
    if resume == "auto":
        return last if last.is_file() else None
    if resume is True:
        if not last.is_file():
            raise UserError(
                f"trainer.resume=true continues from {last}, which does not exist; give the "
                f"interrupted run's directory (hydra.run.dir=...) or a checkpoint "
                f"(trainer.resume=PATH)"
            )
        return last
    return Path(resume)


def restore(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Loads ``path``'s weights, optimizer, schedule and gradient scaler; returns the checkpoint.

    Raises:
        UserError: the file is not a readable checkpoint, or does not fit the model or the
            optimizer (the message names the first mismatched entry).
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if "optimizer" not in ckpt:
        raise UserError(
            f"checkpoint {path} holds the weights only (as best.pt does), not a run to continue; "
            f"resume from the run's last.pt, or start a new run from these weights with "
            f"model.init_from={path}"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(
            f"checkpoint {path} does not fit this run's model or optimizer ({error_summary(err)})"
        ) from err
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


def resume_trainer(trainer: Any, resume: bool | str) -> bool:
    """Puts ``trainer`` (a ``fcnseg.engine.trainer.Trainer``, which imports this module) where
    the checkpoint ``resume`` names (``resume_path``) left its run: weights, optimizer, schedule,
    scaler, counters, the hooks' states and this process's random generators; ``False`` when
    ``trainer.resume=auto`` finds no checkpoint (a new run)."""
    last = trainer.run_dir / "checkpoints" / "last.pt"
    path = resume_path(last, resume)
    if path is None:
        trainer.log.info("trainer.resume=auto: no %s yet, starting a new run", last)
        return False
    ckpt = restore(
        path, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
        scaler=trainer.step.scaler,
    )  # fmt: skip
    trainer.iteration = int(ckpt["iteration"])
    trainer.best_miou = float(ckpt.get("best_miou", -1.0))
    trainer.skips.count = int(ckpt.get("skipped_steps", 0))
    trainer.pending_eval = bool(ckpt.get("pending_eval", False))
    trainer.last_saved = trainer.iteration if path.resolve() == last.resolve() else None
    saved_hooks = ckpt.get("hooks", {})
    for hook in trainer.hooks:
        if hook.name in saved_hooks:
            hook.load_state_dict(saved_hooks[hook.name])
        elif hook.state_dict():
            trainer.log.warning(
                "%s holds no state of hook %s: it starts afresh at iteration %d",
                path, hook.name, trainer.iteration,
            )  # fmt: skip
    saved_position, position = ckpt.get("data"), trainer.data_position()
    if saved_position is not None and saved_position != position:
        trainer.log.warning(
            "the checkpoint's data stream was %s and is now %s: the samples after iteration %d "
            "differ from those an uninterrupted run would have seen",
            saved_position, position, trainer.iteration,
        )  # fmt: skip
    states = ckpt.get("rng")
    if isinstance(states, list) and len(states) == trainer.dist.world_size:
        set_rng_state(states[trainer.dist.rank])
    else:  # another number of processes: fresh, but still seeded, streams
        seed_everything(trainer.settings.seed + trainer.dist.rank + 1_000_003 * trainer.iteration)
    trainer.log.info("resumed from %s at iteration %d", path, trainer.iteration)
    return True


def restart_warnings(run_dir: Path, resume: bool | str) -> list[str]:
    """What to tell a user whose job restarts itself, if anything.

    torchrun restarts failed workers (``--max-restarts``) and SLURM requeues a preempted or
    timed-out job (``hydra/launcher=slurm``) with the command they were given; the run
    continues only when that command names this run directory (``hydra.run.dir``, which is
    otherwise the start time; a multirun's job directories are fixed at submission) and resumes
    from it (``trainer.resume=auto``). Call before the directory is claimed.

    Args:
        run_dir: this run's directory (which Hydra creates, empty, before the run starts).
        resume: ``trainer.resume``.
    """
    restarts, allowed = restart_count(), max_restarts()
    requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    notes = []
    if restarts:
        notes.append(
            f"torchrun restarted the workers after a failure (restart {restarts} of at most "
            f"{allowed} on this machine)"
        )
    if requeues:
        notes.append(f"SLURM requeued this job (start {requeues + 1})")
    if notes and run_dir.is_dir() and not any(run_dir.iterdir()):
        notes.append(
            f"{run_dir} is new: this start does not continue the run that was interrupted, "
            f"whose directory was another; name the run directory (hydra.run.dir=DIR) and add "
            f"trainer.resume=auto so that every restart continues it"
        )
    if not notes and resume is not True and resume != "auto":
        if allowed:
            notes.append(
                f"torchrun --max-restarts={allowed} restarts failed workers with this same "
                f"command, which cannot continue this run (trainer.resume={resume}): add "
                f"trainer.resume=auto"
            )
        elif "SUBMITIT_EXECUTOR" in os.environ:
            notes.append(
                f"a requeued job runs this same command, which cannot continue this run "
                f"(trainer.resume={resume}): add trainer.resume=auto"
            )
    return notes
