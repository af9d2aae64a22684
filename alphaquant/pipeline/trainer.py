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


class FiniteEvaluation(L.Callback):
    """UserError as soon as an evaluation stream holds NaN/Inf, naming where: the decoder layer whose
    outputs went non-finite (a propagate pass) or the head (its logits, or a perplexity that overflows).

    Without it a NaN went on to the end of the run and into the summary as "perplexity nan", after the
    checkpoint was written. The calibration stream needs no check here: callbacks/solve.py refuses
    non-finite activations before the next layer's solve. The walker propagates every stream once per
    decoder layer, in order, so the k-th propagate pass of a stream is layer k. Flags stay on the
    device until the end of a pass (one host sync per pass), and are reduced over DDP ranks.
    """

    STREAMS = {"eval_fp": "original", "eval_q": "quantized", "eval_rtn": "round-to-nearest"}

    def __init__(self, dtype: str = "the model dtype"):
        self.dtype = dtype                        # model.dtype, for the message
        self._passes: dict[str, int] = {}        # stream -> propagate passes so far (= the next layer index)
        self._bad = None                          # device bool: a non-finite value in this pass

    def _watch(self, runner) -> bool:
        plan = getattr(runner, "plan", None)       # only the layer runner's passes carry a plan
        return plan is not None and plan.stream in self.STREAMS and plan.phase in ("propagate", "head")

    def on_predict_start(self, trainer, runner):
        self._bad = None

    def on_predict_batch_end(self, trainer, runner, outputs, batch, batch_idx, dataloader_idx=0):
        import torch
        if not self._watch(runner):
            return
        if runner.plan.phase == "head":
            tensors = [outputs["logits"]]
        else:
            store = runner.stores[runner.plan.stream]
            tensors = [store.hidden[int(i)] for i in outputs["idx"]]
        norms = torch.stack([torch.linalg.vector_norm(t, float("inf")).float() for t in tensors])
        bad = ~torch.isfinite(norms).all()
        self._bad = bad if self._bad is None else self._bad | bad

    def on_predict_end(self, trainer, runner):
        if not self._watch(runner):
            return
        from alphaquant.errors import UserError
        plan = runner.plan
        layer = self._passes.get(plan.stream, 0)
        if plan.phase == "propagate":
            self._passes[plan.stream] = layer + 1
        local = self._bad is not None and bool(self._bad)
        self._bad = None
        what = f"the {self.STREAMS[plan.stream]} model's"
        if trainer.strategy.reduce_boolean_decision(local, all=False):
            where = (f"outputs of decoder layer {layer} (counting from 0)" if plan.phase == "propagate" else
                     "logits, made in the head (final norm + lm_head: every decoder layer's outputs were finite),")
            fix = ("they overflow even in float32: check the checkpoint's weights" if self.dtype == "float32" else
                   f"they overflow in model.dtype {self.dtype}: set model.dtype to float32, or check the weights")
            raise UserError(f"{what} {where} hold NaN or Inf on the evaluation windows (eval.dataset), so its "
                            f"perplexity is undefined; {fix}")
        if plan.phase == "head":
            import math

            from alphaquant.callbacks.perplexity import PerplexityCallback
            for cb in trainer.callbacks:
                ppl = cb.results.get(plan.stream) if isinstance(cb, PerplexityCallback) else None
                if ppl is not None and not math.isfinite(ppl):
                    raise UserError(f"{what} perplexity overflows ({ppl}) although its logits are finite: its mean "
                                    f"next-token loss on eval.dataset is too large for exp(); check the weights")


def build_trainer(cfg, callbacks: list, loggers: list) -> L.Trainer:
    t = cfg.trainer
    callbacks = [*callbacks, FiniteEvaluation(cfg.model.dtype)]    # after PerplexityCallback, so it sees its result
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
