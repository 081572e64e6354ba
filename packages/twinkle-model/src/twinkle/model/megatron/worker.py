"""``MegatronWorker``: one rank of the megatron backend, hosted by any worker of ``twinkle.common.workers``.

It joins the ranks' ``torch.distributed`` group (even alone: megatron's parallel state needs one), lays out
tensor, pipeline and data parallelism with megatron-core (``initialize_model_parallel``: TP ranks adjacent,
then DP, then PP stages) and builds its ``MegatronEngine``. Its calls are ``ModelWorker``'s, driven by the same
``DataParallelBackend``; what differs is told through :meth:`placement`: the ranks of one TP x PP group share
a data shard, one of them returns the shard's results, and checkpoints gather every rank's slices.
"""

from __future__ import annotations

from ..distributed import ModelWorker, Placement, start_process_group


class MegatronUnavailable(RuntimeError):
    """megatron-core is missing, or cannot run on this device."""


class MegatronWorker(ModelWorker):
    collective_saves = True

    def __init__(
        self,
        model_id: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: str | None = None,
        *,
        tp_size: int = 1,
        pp_size: int = 1,
        spill_dir: str | None = None,
        timeout_s: float = 1800.0,
        max_tokens_per_datum: int | None = None,
        token_budget: int | None = None,
        seed: int = 1234,
    ) -> None:
        import torch.distributed as dist

        try:
            from megatron.core import parallel_state as ps
            from megatron.core import tensor_parallel
        except ImportError as e:
            raise MegatronUnavailable(
                f"the megatron backend needs megatron-core ({e}); install twinkle-model[megatron]") from None
        if world_size % (tp_size * pp_size):
            raise ValueError(f"world size {world_size} is not a multiple of tp_size {tp_size} * pp_size {pp_size}")
        dev = start_process_group(rank, world_size, master_addr, master_port, device, timeout_s)
        if not dist.is_initialized():  # alone: a group of one, its store in this process
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        self.rank, self.world_size = rank, world_size
        ps.initialize_model_parallel(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size)
        try:
            # megatron's RNG tracker (model-parallel regions) exists only on CUDA in megatron-core 0.16
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        except (AssertionError, RuntimeError) as e:
            raise MegatronUnavailable(
                f"megatron-core cannot run on {dev.type} here ({e}); the megatron backend needs CUDA devices") from None
        from .engine import MegatronEngine

        self.backend = MegatronEngine(model_id, device=dev, spill_dir=spill_dir,
                                      max_tokens_per_datum=max_tokens_per_datum, token_budget=token_budget)
        self._placement = Placement(dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                    returns_output=ps.get_tensor_model_parallel_rank() == 0
                                    and ps.is_pipeline_last_stage(), collective_saves=True)

    def placement(self) -> Placement:
        return self._placement

    def describe(self):
        return self.backend.describe()

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        super().close()
