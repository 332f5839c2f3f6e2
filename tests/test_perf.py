"""Throughput helpers: MFU's arithmetic and the CPU allocator setting."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rl.perf import (
    model_flops_utilisation,
    peak_flops,
    peak_flops_by_name,
    step_perf,
    training_flops_per_token,
)


def test_mfu_is_none_on_a_cpu_and_six_n_per_token_on_a_known_gpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilisation(torch.nn.Linear(10, 10), 1000.0) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == 989e12
    weight = SimpleNamespace(numel=lambda: 110, device=torch.device("cuda"))
    on_gpu = SimpleNamespace(parameters=lambda: iter([weight]))
    assert model_flops_utilisation(on_gpu, 1000.0) == pytest.approx(6 * 110 * 1000.0 / 989e12)


@pytest.mark.parametrize(
    "name, peak",
    [  # torch.cuda.get_device_name's spelling of each part
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),  # not the SXM part's 989
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),  # not the L4's 121 (a substring match took it)
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA GeForce RTX 3090", None),  # not in the table: no MFU rather than a wrong one
        ("NVIDIA B200", None),
    ],
)
def test_peak_flops_takes_the_most_specific_whole_word_key(name, peak):
    assert peak_flops_by_name(name) == peak


def test_lora_counts_four_flops_per_frozen_parameter_and_six_per_adapter_parameter():
    """Forward 2 per parameter, backward through the activations 2 per parameter, weight
    gradients 2 per trainable parameter only: a frozen [64, 64] base with a rank-4 adapter
    (A [4, 64], B [64, 4]) is 4 * (4096 + 512) + 2 * 512 FLOPs per token, not 6 * 4608."""
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, bias=False)

    full = Block()
    assert training_flops_per_token(full) == 6 * 4096
    lora = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapters == 4 * 64 + 64 * 4
    assert training_flops_per_token(lora) == 4 * (4096 + 512) + 2 * 512


STEP = {"tokens": 600.0, "update_tokens": 800.0, "timing_s/step": 3.0, "timing_s/update": 2.0}


def test_step_perf_on_a_gpu_uses_the_update_phase_and_reports_allocated_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    weight = SimpleNamespace(numel=lambda: 110, device=torch.device("cuda"))
    on_gpu = SimpleNamespace(parameters=lambda: iter([weight]))
    perf = step_perf(STEP, on_gpu, world_size=2)
    assert perf["perf/throughput"] == 600 / 3 / 2  # completion tokens over the whole step
    assert perf["perf/update_throughput"] == 800 / 2 / 2  # what the update ran, over its time
    assert perf["perf/mfu"] == pytest.approx(6 * 110 * 200 / 989e12)
    assert perf["perf/peak_memory_gib"] == 3.0 and "perf/peak_rss_gib" not in perf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB")
def test_step_perf_on_a_cpu_has_no_mfu_and_the_process_peak():
    perf = step_perf(STEP, torch.nn.Linear(10, 10), world_size=1)
    assert perf["perf/update_throughput"] == 400 and "perf/mfu" not in perf
    assert 0.01 < perf["perf/peak_rss_gib"] < 64 and "perf/peak_memory_gib" not in perf
    # a step without an update phase (all groups dropped) reports throughput alone
    assert "perf/update_throughput" not in step_perf(
        {**STEP, "timing_s/update": 0.0}, torch.nn.Linear(1, 1), 1
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("switch, applied", [(None, "True"), ("0", "False")])
def test_keep_freed_memory_applies_on_linux_unless_switched_off(switch, applied):
    env = {k: v for k, v in os.environ.items() if k != "AHA_KEEP_FREED_MEMORY"}
    if switch is not None:
        env["AHA_KEEP_FREED_MEMORY"] = switch
    code = "from rl.perf import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [applied]


def test_run_figures_takes_medians_after_the_warm_up_step_and_peaks_over_all(tmp_path, capsys):
    from rl.benchmarks import run_figures

    lines = [
        {"step": 0, "eval/pass@1": 0.2},  # an evaluation line: no loss, not a step
        {
            "step": 1,
            "loss": 0.1,
            "timing_s/step": 9.0,
            "perf/mfu": 0.01,
            "perf/peak_memory_gib": 7.0,
        },
        {
            "step": 2,
            "loss": 0.1,
            "timing_s/step": 2.0,
            "perf/mfu": 0.30,
            "perf/peak_memory_gib": 5.0,
        },
        {
            "step": 3,
            "loss": 0.1,
            "timing_s/step": 4.0,
            "perf/mfu": 0.20,
            "perf/peak_memory_gib": 5.5,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_figures.main([str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "steps": 2.0,
        "timing_s/step": 3.0,
        "perf/mfu": 0.25,
        "perf/peak_memory_gib": 7.0,
    }
    assert run_figures.main([str(tmp_path)]) == 0
    assert "perf/mfu                 0.2500" in capsys.readouterr().out

    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(lines[1]) + "\n{oops\n" + json.dumps(lines[2]) + "\n"
    )  # (a bad last line is a write cut short by a stop: dropped with a warning, rl/jsonl.py)
    assert run_figures.main([str(tmp_path)]) == 2
    assert "metrics.jsonl, line 2: not JSON" in capsys.readouterr().err
    assert run_figures.main([str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
