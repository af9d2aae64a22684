"""Build the Lightning Trainer, its loggers and the calibration callbacks from a Config."""
from __future__ import annotations

import logging
import os
import warnings

import lightning as L

from alphaquant.pipeline.accelerator import keep_cache_on_resume_end, trainer_accelerator


def quiet_lightning() -> None:
    """Calibration calls trainer.predict once per pass; keep Lightning's per-call chatter out."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


def build_loggers(cfg, run_name: str) -> list:
    """CSVLogger always (when enabled); WandbLogger offline by default, online when asked.

    wandb is optional at run time (the GPU image lacks it): without it the run goes on with
    CSV only and says so.
    """
    loggers = []
    if cfg.logging.csv.enabled:
        from lightning.pytorch.loggers import CSVLogger
        loggers.append(CSVLogger(save_dir=cfg.logging.csv.dir, name=run_name))   # version_N: never clobbers
    wb = cfg.logging.wandb
    if wb.mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            warnings.warn("wandb is not installed: logging to CSV only")
            return loggers
        from lightning.pytorch.loggers import WandbLogger
        os.makedirs(wb.dir, exist_ok=True)
        loggers.append(WandbLogger(project=wb.project, entity=wb.entity, name=wb.name or run_name,
                                   save_dir=wb.dir, offline=(wb.mode == "offline"),
                                   settings=_wandb_settings()))
    return loggers


def _wandb_settings():
    import wandb
    return wandb.Settings(silent=True, console="off")


# Environment variables an MPI launcher sets (Open MPI, MPICH/Hydra and Intel MPI, PMIx, MVAPICH).
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def cluster_plugins() -> list:
    """[LightningEnvironment()] when no cluster launcher started this process, else [] (Lightning detects it).

    Lightning's own detection ends with MPIEnvironment.detect(), which imports mpi4py wherever it is
    installed and so initialises MPI (0.4 s on the GPU image) only to learn that the world has one
    process. Without an MPI launcher's variables MPI cannot see more than one process, so the check
    is skipped then; SLURM, torchrun and LSF are detected by Lightning as before.
    """
    import os

    from lightning.fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)
    if any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)):
        return []
    if any(v in os.environ for v in MPI_LAUNCHER_VARS):
        return []
    return [LightningEnvironment()]


def build_trainer(cfg, callbacks: list, loggers: list) -> L.Trainer:
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=trainer_accelerator(t.accelerator), devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        inference_mode=False,          # tensors made under inference mode could not be updated later
        logger=loggers or False, callbacks=callbacks,
        enable_progress_bar=False,     # one predict per pass: rich shows progress over layers instead
        enable_model_summary=False, enable_checkpointing=False,
        use_distributed_sampler=True,  # fixed, disjoint per-rank shares of the sample indices
        plugins=cluster_plugins(),
    )
    keep_cache_on_resume_end(trainer)
    return trainer
