"""TurboQuantCache across devices: workspaces keyed per device, cache layers on their layer's device, kernel
launches on the tensors' device, and `generate` over two GPUs (accelerate `device_map` split, transformers
tensor parallelism with `tp_plan="auto"`).

CPU, always: the per-device logic itself. CUDA device keys are checked without a GPU (a stubbed
`torch.cuda.current_device`; nothing is allocated), "meta" stands in for a second device, and, with a
CPU-only torch (as CI installs), tensor parallelism runs for real over 2 CPU ranks (gloo), so CI guards the
TP path without GPUs.
GPU, with >= 2 CUDA devices (skipped otherwise): a device_map split over cuda:0/cuda:1 and tensor
parallelism over 2 GPU ranks (NCCL).

How a multi-device run is judged (`_check_against_single_device`). The model is `tiny_llama` (random
weights, head_dim 128, Hq=4, Hkv=2, 4 layers) in bf16; the 80-token prompt exceeds the default 64-token
window, so it is quantized at prefill and decode reads codes plus window. Tensor parallelism reorders bf16
sums (each rank's o_proj/down_proj partials are rounded, then all-reduced), so its logits differ from one
device's by a few bf16 ulps, and random-weight logits are full of near-ties (top-2 margins of one ulp): free
running greedy sequences may then part. So the single-device model is run teacher-forced on the
multi-device tokens (same prefill, then one decode step per token, TurboQuantCache) and:
  1. logits follow DESIGN.md §5 with the single-device fp32 run as the reference and the single-device bf16
     run as the same computation in the model dtype: max|out - ref32| <= 3 max|ref16 - ref32| + 1e-5,
     mean|out - ref32| <= 1.5 mean|ref16 - ref32|;
  2. greedy tokens equal the single-device bf16 argmax at every step whose top-2 margin there exceeds twice
     that step's largest logit difference between the two runs (the others are ties at that precision);
  3. against dense bf16 logits (DynamicCache) of the same run, the default preset's tolerance: relative L2
     error < 0.1 (test_generate.py) and top-1 agreement >= 0.75 (test_models.py; with bf16 random weights
     most disagreements are such ties: on the CPU 0.91 agreement, relative L2 2.7e-2).
A device_map split runs the same kernels on the same inputs on identical GPUs, so there it is expected to
be bit-identical (the printed differences are 0); the same rules hold either way.

GPU command (2 GPUs, from the repository root):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m pytest -q -rs tests/test_multi_gpu.py
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tp_worker import generate_greedy, layer_summary
from conftest import _base, cache_kw
from transformers import AutoModelForCausalLM, LlamaConfig

from tq_hf import TurboQuantCache
from tq_hf import workspace as tq_workspace
from tq_hf.attention import reference_attention
from tq_hf.cache import TurboQuantLayer
from tq_hf.models import tiny_llama
from tq_hf.workspace import get_workspace, workspaces

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_tp_worker.py"
LAYERS, HQ, HKV = 4, 4, 2  # Hq and Hkv divisible by 2 ranks: transformers shards heads, it cannot split one
PROMPT_LEN, N_NEW = 80, 32
# Multicast over NVLink (NVLS) must stay off on the GPU machine.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason=f"needs 2 CUDA GPUs, {torch.cuda.device_count()} visible")
# transformers' TP set-up uses the accelerator torch was built for (torch._C._get_accelerator(), decided at
# compile time), so a CUDA build calls torch.cuda.set_device even with CUDA hidden: CPU ranks need a CPU torch.
cpu_only_torch = pytest.mark.skipif(torch._C._get_accelerator().type != "cpu",
                                    reason=f"CPU ranks need a CPU-only torch; this one is built for "
                                           f"{torch._C._get_accelerator().type}")


# ------------------------------------------------------------------ CPU: per-device logic
def test_bare_cuda_workspace_is_the_current_devices(monkeypatch):
    """`get_workspace` keys by device with the index resolved: "cuda" is the current CUDA device, so it
    shares the workspace of "cuda:1" when cuda:1 is current, and cuda:0 keeps its own. Checked on the CPU
    with a stubbed current device (a Workspace allocates nothing until it is used)."""
    monkeypatch.setattr(tq_workspace, "_WORKSPACES", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert tq_workspace._key("cuda") == torch.device("cuda", 1)
    assert tq_workspace._key("cuda:0") == torch.device("cuda", 0)
    ws1 = get_workspace("cuda")
    assert ws1 is get_workspace("cuda:1") is get_workspace(torch.device("cuda", 1))
    assert ws1.device == torch.device("cuda", 1)
    ws0 = get_workspace(torch.device("cuda:0"))
    assert ws0 is not ws1 and ws0.device == torch.device("cuda", 0)
    assert workspaces() == {torch.device("cuda", 0): ws0, torch.device("cuda", 1): ws1}


def test_kernel_launch_switches_to_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device and its current stream: `on_device`, around every launch,
    makes the tensors' GPU current when it is another one (cuda:1 while cuda:0 is current), and does
    nothing for the current GPU or non-CUDA tensors."""
    from tq_hf.kernels.quantize import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ctx = on_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    for device in ("cuda:0", "cpu", "meta"):
        assert isinstance(on_device(torch.device(device)), contextlib.nullcontext)


@pytest.mark.parametrize("with_model_config", (False, True))
def test_layers_of_one_cache_live_on_different_devices(monkeypatch, with_model_config):
    """Each layer allocates on the device of its first update, whether built lazily or up front from
    `model_config`, so one cache spans the devices of a device_map. Layer 0 on the CPU, layer 1 on "meta"
    (the second device of a CPU-only box): every tensor a layer holds stays on its device through a
    quantized prefill, a decode step into the window, dequantization, attention over the codes (scratch
    from that device's workspace) and beam reordering with an index on the CPU."""
    # The NaN/Inf check reads values, which meta tensors do not have.
    monkeypatch.setattr(TurboQuantLayer, "_check_values", lambda self, key_states, value_states: None)
    monkeypatch.setattr(tq_workspace, "_WORKSPACES", {})
    devices = (torch.device("cpu"), torch.device("meta"))
    model_config = LlamaConfig(**_base(num_hidden_layers=len(devices))) if with_model_config else None
    cache = TurboQuantCache(residual_length=4, model_config=model_config)
    B, H, D = 2, 2, 64
    for T in (9, 1):  # a prefill longer than the window (quantized), then one decode token (window)
        for idx, device in enumerate(devices):
            k = torch.randn(B, H, T, D, device=device)
            cache.update(k, k.clone(), idx)
    assert [s["devices"] for s in layer_summary(cache)] == [[str(d)] for d in devices]
    for layer, device in zip(cache.layers, devices):
        assert (layer.n_quant, layer.n_window) == (9, 1) and layer.device == device
        assert all(t.device == device for t in layer.dequantize_range(0, 10))
        query = torch.randn(B, 2 * H, 1, D, device=device)
        assert reference_attention(query, layer, 10).device == device
    assert set(workspaces()) == set(devices)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert [s["devices"] for s in layer_summary(cache)] == [[str(d)] for d in devices]


# ------------------------------------------------------------------ generate across devices
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`tiny_llama` with Hq=4, Hkv=2 and 4 layers in bf16, saved with its prompt (`prompt.pt`: 2 rows of
    PROMPT_LEN random byte tokens, no padding)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model, _ = tiny_llama(dtype=torch.bfloat16, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                          num_key_value_heads=HKV)
    model.save_pretrained(path)
    ids = torch.randint(0, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path / "prompt.pt")
    return path


def _load(model_dir, dtype, device_map):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map,
                                                attn_implementation="turboquant").eval()


def _prompt(model_dir, device):
    return {k: v.to(device) for k, v in torch.load(model_dir / "prompt.pt").items()}


def _teacher_forced(model, inputs, sequences):
    """Single-device TurboQuant logits `[B, N_NEW, V]` (fp32) of the steps that produced `sequences`: the
    prompt's prefill (last position only, as generate), then one decode step per generated token but the
    last. Prompts have no padding, so the decode steps need no mask."""
    cache = TurboQuantCache()
    sequences = sequences.to(inputs["input_ids"].device)
    with torch.no_grad():
        logits = [model(**inputs, logits_to_keep=1, **cache_kw(cache)).logits]
        for t in range(PROMPT_LEN, sequences.shape[1] - 1):
            logits.append(model(sequences[:, t : t + 1], **cache_kw(cache)).logits)
    return torch.cat(logits, 1).float().cpu()


def _check_against_single_device(result, model_dir, device):
    """The three rules of the module docstring for a multi-device `generate_greedy` result."""
    inputs = _prompt(model_dir, device)
    ref16, ref32 = (_teacher_forced(_load(model_dir, dtype, device), inputs, result["sequences"])
                    for dtype in (torch.bfloat16, torch.float32))
    out, tokens = result["logits"], result["sequences"][:, PROMPT_LEN:]
    err, err_pt = (out - ref32).abs(), (ref16 - ref32).abs()
    diff = (out - ref16).abs().amax(-1)  # per step
    top2 = ref16.topk(2, dim=-1).values
    tie = top2[..., 0] - top2[..., 1] <= 2 * diff
    dense = result["dense_logits"]
    agree = (dense.argmax(-1) == out.argmax(-1)).float().mean().item()
    rel = ((dense - out).norm() / dense.norm()).item()
    print(f"\nvs single device: max|dlogit| {diff.max().item():.3e} (bf16 vs fp32 there: {err_pt.max().item():.3e}), "
          f"{int(tie.sum())} of {tie.numel()} steps are ties at that precision; vs dense bf16: "
          f"top-1 agreement {agree:.3f}, relative L2 {rel:.3e}")
    assert err.max() <= 3 * err_pt.max() + 1e-5
    assert err.mean() <= 1.5 * err_pt.mean()
    mismatch = (tokens != ref16.argmax(-1)) & ~tie
    assert not mismatch.any(), f"tokens differ from the single device at (row, step) {mismatch.nonzero().tolist()}"
    assert rel < 0.1 and agree >= 0.75


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=cpu_only_torch),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_two_gpus])])
def test_tensor_parallel_over_two_ranks(model_dir, tmp_path, device):
    """`tp_plan="auto"` over 2 ranks (tests/_tp_worker.py under torch.distributed.run): each rank's cache
    holds Hkv/2 KV heads on that rank's device and is read by the "turboquant" attention, and generate
    matches the single-device TurboQuant run and dense bf16 (module docstring). CPU ranks talk over
    gloo, GPU ranks over NCCL."""
    out = tmp_path / "tp.pt"
    # The ranks import this checkout, as the test process does when pytest runs from the repository root.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(model_dir), str(out), str(N_NEW)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = torch.load(out)
    for rank, info in enumerate(result["ranks"]):
        rank_device = "cpu" if device == "cpu" else f"cuda:{rank}"
        assert info["device"] == rank_device
        assert info["layers"] == [{"devices": [rank_device], "kv_heads": HKV // 2, "fast_path": True}] * LAYERS
    _check_against_single_device(result, model_dir, "cpu" if device == "cpu" else "cuda:0")


@pytest.mark.gpu
@needs_two_gpus
def test_device_map_split_over_two_gpus(model_dir, monkeypatch):
    """accelerate device_map: embeddings and the first half of the layers on cuda:0, the rest, the final
    norm and lm_head on cuda:1. Each cache layer lives on its decoder layer's GPU and is read by the
    "turboquant" attention, both GPUs got a workspace, and generate matches the single-GPU TurboQuant run
    and dense bf16 (module docstring)."""
    monkeypatch.setattr(tq_workspace, "_WORKSPACES", {})
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": int(i >= LAYERS // 2) for i in range(LAYERS)}}
    model = _load(model_dir, torch.bfloat16, device_map)
    result, cache = generate_greedy(model, _prompt(model_dir, "cuda:0"), N_NEW)
    layer_devices = [str(layer.self_attn.k_proj.weight.device) for layer in model.model.layers]
    assert layer_devices == ["cuda:0"] * (LAYERS // 2) + ["cuda:1"] * (LAYERS - LAYERS // 2)
    assert layer_summary(cache) == [{"devices": [d], "kv_heads": HKV, "fast_path": True}
                                    for d in layer_devices]
    assert set(workspaces()) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    _check_against_single_device(result, model_dir, "cuda:0")


@needs_two_gpus
def test_bench_generate_over_two_gpus(tmp_path):
    """`bench generate --gpus 2`: accelerate's balanced split puts layers (and so cache layers) on both GPUs,
    every system's rows run, and memory is summed over the two GPUs."""
    from tq_hf import bench

    tiny = {"layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512}
    result = bench.bench_generate([160], [2], ["4bit"], device="cuda", gpus=2, steps=2, warmup=1, attn_steps=1,
                                  hf_backend="none", progress=False, **tiny)
    assert result["environment"]["gpus"] == 2 and result["settings"]["gpus"] == 2
    assert set(result["model"]["device_map"].values()) == {"0", "1"}
    assert [r["system"] for r in result["rows"]] == ["DynamicCache bf16 + SDPA", "DynamicCache bf16 + SDPA flash",
                                                     "TurboQuant 4bit"]
    for r in result["rows"]:
        assert r["status"] == "ok", r["status"]
        assert r["peak_mem_bytes"] > r["cache_bytes"] > 0 and "summed over GPUs" in r["memory_source"]

