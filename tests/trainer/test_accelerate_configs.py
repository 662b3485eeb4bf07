"""configs/accelerate/: every launch config parses with accelerate's own launcher code, and the FSDP config
shards the DiT by its TransformerBlock (checked on CPU: parsing needs no GPU)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer, TransformerBlock

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def _launch_args(name: str) -> object:
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "trainer.teacher"])
    return _validate_launch_command(args)[0]  # merges the file; unknown keys raise


def test_the_configs_are_the_ones_documented() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["ddp.yaml", "fsdp_wan1.3b.yaml"]


def test_ddp_config_is_multi_gpu_bf16_on_gpus() -> None:
    args = _launch_args("ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.cpu
    assert args.mixed_precision == "bf16" and args.num_machines == 1


def test_fsdp_config_wraps_each_dit_block_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _launch_args("fsdp_wan1.3b.yaml")
    assert args.use_fsdp and not args.cpu and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)  # what `accelerate launch` hands each process
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads and validates those variables
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["TransformerBlock"]
    assert str(plugin.state_dict_type) == "StateDictType.FULL_STATE_DICT"
    plugin.set_auto_wrap_policy(CausalWanTransformer(get_preset("test").model))  # the class name must resolve
    assert isinstance(plugin.auto_wrap_policy, functools.partial)
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {TransformerBlock}
