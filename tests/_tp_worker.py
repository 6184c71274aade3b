"""One rank of a tensor-parallel `generate` with TurboQuantCache. tests/test_multi_gpu.py launches it as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_tp_worker.py MODEL_DIR OUT N_NEW

Every rank loads MODEL_DIR (bf16, attn_implementation="turboquant") with the model's own tensor-parallel
plan (`tp_plan="auto"`: q/k/v projections column-wise, o_proj row-wise, so each rank holds Hq/2 query and
Hkv/2 KV heads) and runs `generate_greedy` on the prompt saved in MODEL_DIR/prompt.pt. Rank 0 saves to OUT
that function's result plus `ranks`: per rank, its device and `layer_summary` of its cache. transformers sets
up the process group itself, for the accelerator torch was built for: NCCL on CUDA, gloo with a CPU-only torch.

`generate_greedy` and `layer_summary` are shared with the single-process runs of the test.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import cache_kw  # this script's folder (tests/) is on sys.path
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.distributed import DistributedConfig

from tq_hf import TurboQuantCache


def generate_greedy(model, inputs: dict, n_new: int) -> tuple[dict, TurboQuantCache]:
    """Greedy `generate` of `n_new` tokens with a fresh `TurboQuantCache()` (default preset), then the dense
    logits of the same steps: one forward of the generated sequence with a `DynamicCache` (exact K/V).

    Returns `({"sequences": [B, T + n_new], "logits": [B, n_new, V], "dense_logits": [B, n_new, V]}, cache)`,
    tensors on the CPU, logits in fp32.
    """
    cache = TurboQuantCache()
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=n_new, output_logits=True,
                             return_dict_in_generate=True, **cache_kw(cache))
        mask = F.pad(inputs["attention_mask"], (0, n_new), value=1)
        dense = model(gen.sequences, attention_mask=mask, **cache_kw(DynamicCache())).logits[:, -n_new - 1 : -1]
    result = {"sequences": gen.sequences.cpu(), "logits": torch.stack(gen.logits, 1).float().cpu(),
              "dense_logits": dense.float().cpu()}
    return result, cache


def layer_summary(cache: TurboQuantCache) -> list[dict]:
    """Per cache layer: the devices of the tensors it holds, its KV-head count, and whether the "turboquant"
    attention claimed it (read the packed codes itself)."""
    return [{"devices": sorted({str(t.device) for t in vars(layer).values() if torch.is_tensor(t)}),
             "kv_heads": layer.num_heads, "fast_path": layer.fast_path} for layer in cache.layers]


def main(model_dir: str, out: str, n_new: int) -> None:
    # DistributedConfig(tp_plan="auto") is `from_pretrained(..., tp_plan="auto")` without the FutureWarning
    # that transformers >= 5.17 gives for the bare argument.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.bfloat16,
        attn_implementation="turboquant",
    ).eval()
    inputs = {k: v.to(model.device) for k, v in torch.load(f"{model_dir}/prompt.pt").items()}
    result, cache = generate_greedy(model, inputs, n_new)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"device": str(model.device), "layers": layer_summary(cache)})
    if dist.get_rank() == 0:
        torch.save({**result, "ranks": ranks}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
