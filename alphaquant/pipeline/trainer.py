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


WANDB_PROBE_SECONDS = 3.0


def check_wandb_online(wb, timeout: float = WANDB_PROBE_SECONDS) -> None:
    """ConfigError, within `timeout` seconds, when logging.wandb.mode is online but W&B cannot work.

    wandb.init would otherwise retry for about a minute and a half, after the model and the data
    were loaded, and end in a traceback. Checked: credentials (WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, a .netrc entry for the host, the api_key of wandb's settings file)
    and a TCP connection to the server (WANDB_BASE_URL, default https://api.wandb.ai). Nothing is
    checked when wandb is not installed (the run logs to CSV only) or WANDB_MODE in the
    environment takes it offline (WandbLogger passes no mode, so the variable wins).
    """
    import importlib.util
    from urllib.parse import urlsplit

    from alphaquant.errors import ConfigError

    if wb.mode != "online" or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    if importlib.util.find_spec("wandb") is None:
        return
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    instead = ("or set logging.wandb.mode to offline (upload later with `wandb sync`) or disabled")
    if not _wandb_credentials(url.netloc or host):
        raise ConfigError(f"logging.wandb.mode is 'online' but no W&B credentials were found (WANDB_API_KEY is "
                          f"unset and {_netrc_path()} has no entry for {url.netloc or host}); run `wandb login` "
                          f"or set WANDB_API_KEY, {instead}")
    why = _probe(host, port, timeout)
    if why is not None:
        raise ConfigError(f"logging.wandb.mode is 'online' but the W&B server {host}:{port} cannot be reached "
                          f"({why}); check the network or WANDB_BASE_URL, {instead}")


def _netrc_path() -> str:
    if os.environ.get("NETRC"):
        return os.path.expanduser(os.environ["NETRC"])
    for name in ("~/.netrc", "~/_netrc"):
        if os.path.exists(os.path.expanduser(name)):
            return os.path.expanduser(name)
    return os.path.expanduser("~/.netrc")


def _wandb_credentials(netloc: str) -> bool:
    """True when wandb would find an API key (the sources wandb.sdk.lib.wbauth reads, in its order)."""
    import configparser
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        creds = netrc.netrc(_netrc_path()).authenticators(netloc)
        if creds and creds[2]:
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    settings = configparser.ConfigParser()
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.expanduser("~/.config/wandb")
    try:
        settings.read(os.path.join(config_dir, "settings"))
    except configparser.Error:
        return False
    return bool(settings.get("default", "api_key", fallback=""))


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s, else why not. The name lookup
    (which socket timeouts do not cover) runs in a daemon thread, so the whole probe is bounded."""
    import socket
    import threading

    result: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e.strerror or e}")

    t = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


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
