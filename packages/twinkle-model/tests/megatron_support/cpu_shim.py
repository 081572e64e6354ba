"""TEST-ONLY: let megatron-core 0.16.1 run on CPU (gloo), so its backend can be tested on machines without GPUs.

Why: megatron-core assumes CUDA even where the math is device-agnostic. On a CPU-only torch these calls fail:

- ``torch.cuda.current_device()`` (rotary embedding, tensor-parallel layers and mappings, attention, the global
  memory buffer, GPTModel, p2p communication) -> answers ``torch.device("cpu")``;
- ``torch.cuda.synchronize()`` (p2p communication) -> no-op;
- the CUDA RNG tracker (``tensor_parallel/random.py``: ``model_parallel_cuda_manual_seed``, ``fork()`` around
  attention dropout) -> keeps its states for the CPU default generator, the one CPU dropout draws from;
- ``device="cuda"`` literals (causal masks in ``transformer/utils.py``, ``total_num_tokens`` in
  ``pipeline_parallel/schedules.py``) -> those two modules see a ``torch`` whose factories map "cuda" to cpu;
- ``weight.data.cuda()`` when tied embeddings are synchronised across pipeline stages -> stays on CPU.

The first two are process-wide patches of ``torch.cuda``: acceptable in test rank processes only, and the
reason this module lives under ``tests/`` and product code never imports it. Nothing is patched when CUDA is
available, so the same test stack runs unmodified on GPU machines.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any

_installed = False


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: tensor factories turn ``device="cuda"`` into cpu."""

    _FACTORIES = ("ones", "zeros", "empty", "full", "tensor", "arange", "rand", "randn", "randint")

    def __init__(self, torch_module: Any) -> None:
        super().__init__("torch")
        self._torch = torch_module
        for name in self._FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch_module, name)))

    @staticmethod
    def _on_cpu(fn):
        def wrapper(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and str(dev).startswith("cuda"):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return wrapper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)


class _Namespace(types.SimpleNamespace):
    """The given attributes; anything else from ``fallback``."""

    def __init__(self, fallback: Any, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._fallback = fallback

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


class _DropCpuRngWarning(logging.Filter):
    # The tracker's "CUDA" generator *is* the CPU one here, so its warning that the CPU state moved inside a
    # fork() (dropout drew numbers) is expected noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def install() -> None:
    """Patch megatron-core (imported here) for CPU execution; idempotent, and a no-op when CUDA is available."""
    global _installed
    import torch

    if _installed or torch.cuda.is_available():
        return
    _installed = True

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda device=None: None

    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as tf_utils
    from megatron.core.models.common.language_module.language_module import LanguageModule

    cpu_torch = _CpuTorch(torch)
    tf_utils.torch = cpu_torch
    schedules.torch = cpu_torch

    # RNG tracker: the "CUDA" generator is the CPU default generator.
    rng_torch = _CpuTorch(torch)
    rng_torch.cuda = _Namespace(
        torch.cuda,
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
    )
    tp_random.torch = rng_torch
    tp_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(tp_random.__name__).addFilter(_DropCpuRngWarning())

    # Tied embeddings across pipeline stages: megatron moves the copy with ``.data.cuda()`` before all-reducing.
    original_setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self) -> None:
        with _tensor_cuda_is_identity(torch):
            original_setup(self)

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


@contextlib.contextmanager
def _tensor_cuda_is_identity(torch: Any):
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
