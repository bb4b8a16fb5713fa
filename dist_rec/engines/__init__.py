"""Engines for the dense part of a model whose embedding tables dist_rec shards.

The trainer's default is DDP (``DistributedModelParallel`` wraps the model
itself). ``deepspeed_engine`` hands the dense parameters to DeepSpeed ZeRO
(stage 1 or 2) instead. DeepSpeed is an optional dependency: nothing here
imports it until that engine is built.
"""
