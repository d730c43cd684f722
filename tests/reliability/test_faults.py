"""Issue 12, faults during a run: the engine's side (out of memory on the CPU, NaN images).

Each fault is injected into a real tiny pipeline (render.testing's kit): the allocator's
error raised from the UNet, NaN produced by the VAE decoder.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest

from render.cli import main
from render.ledger import Ledger
from render.models import ModelResolver
from render.tasks import Batch, Task

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 "
           "bytes. Error code 12 (Cannot allocate memory)")


def task_for(kit: Path, seed: int = 5) -> Task:
    task = Task(job="t", index=0, prompt="a red house", negative="", seed=seed,
                model="tiny-sd15", width=64, height=64, steps=2, cfg=7.0, sampler="Euler a")
    return dataclasses.replace(
        task, files={"model": ModelResolver([kit], {}, kit).resolve_model(task.model)})


def new_engine(**kw: Any) -> Any:
    import pluggy

    from render import hookspecs
    from render.engine import Engine

    pm = pluggy.PluginManager("render")
    pm.add_hookspecs(hookspecs)
    return Engine(pm, device="cpu", **kw)


class NaNDecoder:
    """The VAE decoder returns NaN, always or only when it runs in reduced precision (the
    fp16 VAE overflow that real SD1.5/SDXL VAEs show)."""

    def __init__(self, vae: Any, *, only_reduced: bool) -> None:
        self.decoder, self.only_reduced = vae.decoder, only_reduced
        self.calls: list[str] = []

    def __enter__(self) -> NaNDecoder:
        original = type(self.decoder).forward

        def forward(z: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self.decoder, z, *args, **kwargs)
            self.calls.append(str(z.dtype))
            if not self.only_reduced or z.dtype != torch.float32:
                out = out * float("nan")
            return out

        self.decoder.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.decoder.forward


def test_cpu_allocation_failure_turns_on_the_memory_savers(kit: Path) -> None:
    """Issue 12: a CPU allocation failure (DefaultCPUAllocator: can't allocate memory) is out
    of memory, so the savers run and the image renders instead of the task failing."""
    eng = new_engine()
    task = task_for(kit)
    (clean,) = eng.render(Batch(("t",), (task,)))
    unet = next(iter(eng.residents.values())).pipe.unet
    original, raised = unet.forward, []

    def forward(*args: Any, **kwargs: Any) -> Any:
        if len(raised) < 1:
            raised.append(1)
            raise RuntimeError(CPU_OOM)
        return original(*args, **kwargs)

    unet.forward = forward
    try:
        (saved,) = eng.render(Batch(("t",), (task,)))
    finally:
        unet.forward = original
    assert raised and "attention slicing" in saved.notes
    a = np.asarray(clean.images[0], dtype=np.int16)
    b = np.asarray(saved.images[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_nan_decode_in_reduced_precision_is_decoded_again_in_float32(kit: Path) -> None:
    """Issue 12: an all-NaN decode (black image) in half precision is retried once with the
    VAE in float32, and the image that comes back is a real one."""
    eng = new_engine(dtype="bfloat16")
    task = task_for(kit)
    (clean,) = eng.render(Batch(("t",), (task,)))
    vae = next(iter(eng.residents.values())).vae
    with NaNDecoder(vae, only_reduced=True) as nan:
        (result,) = eng.render(Batch(("t",), (task,)))
    assert nan.calls == ["torch.bfloat16", "torch.float32"]
    assert "VAE decoded in float32 after NaN" in result.notes
    assert str(vae.dtype) == "torch.bfloat16"        # cast back for the next batch
    pixels = np.asarray(result.images[0], dtype=np.int16)
    assert pixels.std() > 1                            # not black, not flat
    assert np.abs(pixels - np.asarray(clean.images[0], dtype=np.int16)).max() <= 8


def test_nan_image_fails_its_task_and_is_never_recorded_done(kit: Path, tmp_path: Path) -> None:
    """Issue 12: an image that stays NaN fails its task with a clear message; no black image
    is written or recorded as done, and the other tasks of the batch render."""
    plugin = tmp_path / "plugins" / "nan_vae.py"
    plugin.parent.mkdir()
    plugin.write_text(textwrap.dedent('''
        import torch
        from render.api import hookimpl

        @hookimpl
        def configure_pipeline(pipe, batch):
            decoder = pipe.vae.decoder
            original = type(decoder).forward
            bad = any(t.seed == 2 for t in batch.tasks)
            def forward(z, *args, **kwargs):
                out = original(decoder, z, *args, **kwargs)
                return out * float("nan") if bad else out
            decoder.forward = forward
    '''))
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   "output: {dir: \"out/{job}\", name: \"{seed}\", grid: false}\n"
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2}\n"
                   "jobs:\n  - name: nan\n    prompt: a house\n    seeds: [1, 2, 3]\n")
    code = main([str(job), "--plugins-dir", str(plugin.parent), "--batch-size", "3", "-q"])
    assert code == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "nan").iterdir()) == ["1.png", "3.png"]
    with Ledger(out) as ledger:
        failed = ledger.rows(status="failed")
        assert len(ledger.rows(status="done")) == 2
    assert [row.seed for row in failed] == [2]
    assert "NaN" in (failed[0].error or "") and "black" in (failed[0].error or "")
