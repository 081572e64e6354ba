"""The megatron-core training backend: tensor, pipeline and data parallelism, per-projection LoRA.

``bridge`` builds a megatron ``GPTModel`` from a HuggingFace config and converts weights both ways; ``lora``
puts many runs' PEFT-layout adapters on its fused tensor-parallel layers; ``engine`` is one rank's
``TrainingBackend``; ``worker`` starts a rank for ``distributed.DataParallelBackend`` to drive. Importing
this package imports no megatron code: megatron-core is an optional extra (``twinkle-model[megatron]``).
"""
