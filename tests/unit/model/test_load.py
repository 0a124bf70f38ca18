"""Where the base is placed at load, decided from device facts (GPU facts passed in: a CPU run cannot show them)."""
from __future__ import annotations

import pytest

from qlaunch.config.engine import Engine
from qlaunch.model.gptq import TRAINABLE_BACKEND, trainable_backend
from qlaunch.model.load import device_map_for

DDP, ZERO2, ZERO3 = Engine(), Engine("deepspeed", zero_stage=2), Engine("deepspeed", zero_stage=3)
FSDP2, FSDP2_OFFLOAD = Engine("fsdp2"), Engine("fsdp2", offload_optimizer=True, offload_params=True)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "gptq"])
@pytest.mark.parametrize("engine", [FSDP2, FSDP2_OFFLOAD, ZERO3])
def test_sharding_engines_build_a_4bit_base_in_host_memory_never_on_the_gpu(quant, engine):
    # fully_shard / zero.Init then move one module / parameter at a time to the GPU and keep this rank's shard
    assert device_map_for(quant, cuda=True, engine=engine, local_rank=3) == {"": "cpu"}


@pytest.mark.parametrize("quant", ["nf4", "fp4", "gptq"])
@pytest.mark.parametrize("engine", [DDP, ZERO2])
def test_replicating_engines_put_each_rank_s_4bit_copy_on_its_own_gpu(quant, engine):
    assert device_map_for(quant, cuda=True, engine=engine, local_rank=3) == {"": 3}
    assert device_map_for(quant, cuda=True, engine=engine, local_rank=0) == {"": 0}


@pytest.mark.parametrize("engine", [DDP, ZERO2, ZERO3, FSDP2])
def test_full_precision_bases_load_without_a_device_map(engine):
    # under ZeRO-3 transformers builds them inside deepspeed.zero.Init itself
    assert device_map_for(None, cuda=True, engine=engine, local_rank=1) is None


@pytest.mark.parametrize("engine", [DDP, ZERO2, FSDP2])
def test_without_cuda_a_quantized_base_loads_on_the_cpu(engine):
    assert device_map_for("nf4", cuda=False, engine=engine, local_rank=1) == {"": "cpu"}


@pytest.mark.parametrize("engine", [ZERO3, FSDP2, FSDP2_OFFLOAD])
def test_a_gptq_base_built_on_the_host_for_a_gpu_gets_the_torch_kernel_that_runs_everywhere(engine):
    # gptqmodel would pick TorchAtenLinear (CPU only) for layers built on the host
    placed = device_map_for("gptq", cuda=True, engine=engine, local_rank=1)
    assert trainable_backend(cuda=True, built_on_host=placed in (None, {"": "cpu"})) == "torch"


@pytest.mark.parametrize("engine", [DDP, ZERO2])
def test_a_gptq_base_built_on_its_gpu_or_trained_on_the_cpu_lets_gptqmodel_choose(engine):
    placed = device_map_for("gptq", cuda=True, engine=engine, local_rank=1)
    assert trainable_backend(cuda=True, built_on_host=placed in (None, {"": "cpu"})) == TRAINABLE_BACKEND
    assert trainable_backend(cuda=False, built_on_host=True) == TRAINABLE_BACKEND


def test_the_zero3_flag_is_hidden_only_while_a_quantized_base_loads():
    """transformers refuses a device_map under ZeRO-3; a quantized base is loaded into host memory with the flag
    hidden, and the flag is back (for the Trainer and DeepSpeed) right after — also when loading fails."""
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from qlaunch.model.load import zero3_flag_hidden

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with zero3_flag_hidden(True):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with zero3_flag_hidden(False):
            assert is_deepspeed_zero3_enabled()
        with pytest.raises(RuntimeError), zero3_flag_hidden(True):
            raise RuntimeError("the load failed")
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
    with zero3_flag_hidden(True):  # no DeepSpeed config at all: nothing to hide
        assert not is_deepspeed_zero3_enabled()
    del config
