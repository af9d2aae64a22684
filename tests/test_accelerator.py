"""The trainer's CUDA accelerator keeps the allocator cache between predict calls (Lightning's own
empties it twice per call, i.e. twice per pass of the layer walk)."""
import lightning as L
import pytest
import torch

from alphaquant.pipeline.accelerator import CachedCUDAAccelerator, trainer_accelerator


def test_config_values_map_to_the_cached_accelerator_only_for_cuda(monkeypatch):
    assert trainer_accelerator("cpu") == "cpu"
    assert isinstance(trainer_accelerator("gpu"), CachedCUDAAccelerator)
    assert isinstance(trainer_accelerator("cuda"), CachedCUDAAccelerator)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer_accelerator("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(trainer_accelerator("auto"), CachedCUDAAccelerator)


def test_setup_and_teardown_do_not_empty_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("cublas"), raising=False)
    flags = []
    monkeypatch.setattr(CachedCUDAAccelerator, "set_nvidia_flags", staticmethod(flags.append))
    acc = CachedCUDAAccelerator()
    acc.setup(type("T", (), {"local_rank": 0})())
    acc.teardown()
    assert calls == [] and flags == [0]
    # the reference: Lightning's accelerator clears in both (what made every pass re-allocate)
    from lightning.pytorch.accelerators import CUDAAccelerator
    CUDAAccelerator.teardown(acc)
    assert calls == ["cublas", "empty_cache"]


class _Alloc(L.LightningModule):
    def predict_step(self, batch, i):
        return torch.empty(64 << 20, dtype=torch.uint8, device=self.device).fill_(1).sum()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_survives_predict_calls_on_gpu():
    from alphaquant.pipeline.trainer import quiet_lightning
    quiet_lightning()
    dl = torch.utils.data.DataLoader(torch.arange(2), batch_size=1)
    kw = dict(devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, inference_mode=False)
    trainer = L.Trainer(accelerator=trainer_accelerator("gpu"), **kw)
    trainer.predict(_Alloc(), dl, return_predictions=False)
    assert torch.cuda.memory_reserved() >= 64 << 20               # the pass's buffer is still cached
    plain = L.Trainer(accelerator="gpu", **kw)
    plain.predict(_Alloc(), dl, return_predictions=False)
    assert torch.cuda.memory_reserved() == 0                       # Lightning's own gives it back


def test_cluster_detection_skips_mpi_only_without_a_launcher(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    from alphaquant.pipeline.trainer import MPI_LAUNCHER_VARS, cluster_plugins
    for v in MPI_LAUNCHER_VARS + ("SLURM_NTASKS", "SLURM_JOB_NAME", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                                  "LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    plugins = cluster_plugins()
    assert len(plugins) == 1 and isinstance(plugins[0], LightningEnvironment)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")            # under mpirun Lightning must detect MPI itself
    assert cluster_plugins() == []
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")              # torchrun: Lightning's TorchElastic environment
    for v in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(v, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cluster_plugins() == []


def test_predict_runs_never_empty_the_cuda_cache(monkeypatch):
    """Through build_trainer (CPU here): a predict call does not reach torch.cuda.empty_cache (Lightning's
    checkpoint connector calls it on every run)."""
    from alphaquant.config.run import Config
    from alphaquant.pipeline.trainer import build_trainer, quiet_lightning
    quiet_lightning()
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    cfg = Config.from_dict({"model": {"path": "unused"}, "trainer": {"accelerator": "cpu", "devices": 1}})
    trainer = build_trainer(cfg, [], [])
    dl = torch.utils.data.DataLoader(torch.arange(2), batch_size=1)
    trainer.predict(_Noop(), dl, return_predictions=False)
    assert calls == []
    plain = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    plain.predict(_Noop(), dl, return_predictions=False)
    assert calls == [1]                  # the reference: Lightning's own run empties it once


class _Noop(L.LightningModule):
    def predict_step(self, batch, i):
        return None
