"""Generate modes beyond test_generate.py (greedy, sampling, beam search, left padding, multi-turn live there):
assisted decoding with an assistant model and prompt-lookup decoding (both crop the cache), chunked prefill,
output_attentions=True (dense fallback that returns real weights), an unpadded batch through the softcap
path, StaticCache under the "turboquant" attention, pipeline("text-generation"), device_map="auto" and
accelerate CPU offload hooks.

Exactness: "exact" caches are TurboQuantCache(residual_length=1000) (TurboQuant layers, nothing quantized)
or every layer skipped; "8bit" compares greedy tokens with the llama seed test_generate.py validated
against near-ties (EXACT_SEEDS).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, VOCAB, cache_kw, greedy_kwargs, left_padded_batch, make_model
from transformers import DynamicCache, StaticCache

import tq_hf.cache as tq_cache
from tq_hf import TurboQuantCache, TurboQuantLayer

N_NEW = 10
SEED = 3  # test_generate.EXACT_SEEDS["llama"]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", "sdpa", seed=SEED)


@pytest.fixture
def model_as(llama):
    def get(attn):
        llama.set_attn_implementation(attn)
        return llama

    yield get
    llama.set_attn_implementation("sdpa")


@pytest.fixture
def crop_calls(monkeypatch):
    calls = []
    real = tq_cache.TurboQuantLayer.crop

    def spy(self, n):
        calls.append(n)
        return real(self, n)

    monkeypatch.setattr(tq_cache.TurboQuantLayer, "crop", spy)
    return calls


def _caches():
    return {
        "exact": lambda: TurboQuantCache(residual_length=1000),
        "8bit": lambda: TurboQuantCache("8bit", residual_length=2),
    }


def _assert_int_lengths(cache):
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            assert type(layer.n_quant) is int and type(layer.n_window) is int


# ------------------------------------------------------------------ crop-based modes
@pytest.mark.parametrize("kind", ("exact", "8bit"))
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_assisted_decoding_with_assistant_model(model_as, crop_calls, attn, kind):
    model = model_as("sdpa")
    ids, mask = left_padded_batch((9,))
    ref = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache()))
    assistant = make_model("llama", "sdpa", seed=11, num_hidden_layers=1)
    model = model_as(attn)
    cache = _caches()[kind]()
    out = model.generate(ids, attention_mask=mask, assistant_model=assistant, **greedy_kwargs(N_NEW), **cache_kw(cache))
    assert torch.equal(out, ref)
    assert crop_calls  # rejected candidate tokens were cropped from the TurboQuantCache
    _assert_int_lengths(cache)  # transformers 5.17 passes 0-d tensors to crop
    assert cache.get_seq_length() == out.shape[1] - 1
    assert all(layer.fast_path == (attn == "turboquant") for layer in cache.layers)
    if kind == "8bit":
        assert cache.layers[0].n_quant > 0


@pytest.mark.parametrize("kind", ("exact", "8bit"))
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_prompt_lookup_decoding(model_as, crop_calls, attn, kind):
    model = model_as("sdpa")
    # A repetitive prompt so that lookup candidates exist.
    ids = torch.tensor([[1] + [5, 6, 7, 8, 9] * 3])
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache()))
    model = model_as(attn)
    cache = _caches()[kind]()
    out = model.generate(ids, attention_mask=mask, prompt_lookup_num_tokens=3, **greedy_kwargs(N_NEW),
                         **cache_kw(cache))
    assert torch.equal(out, ref)
    assert crop_calls
    _assert_int_lengths(cache)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_crop_accepts_tensor_counts():
    """transformers 5.17's candidate generators pass crop() 0-d tensors: lengths must stay Python ints."""
    cache = TurboQuantCache(residual_length=4, backend="torch")
    cache.update(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64), 0)
    cache.update(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), 0)
    cache.crop(torch.tensor(-1))
    assert cache.get_seq_length() == 11 and type(cache.get_seq_length()) is int
    cache.crop(torch.tensor(-5))
    assert cache.get_seq_length() == 6 and type(cache.layers[0].n_quant) is int


@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_chunked_prefill(model_as, attn, continuation_calls):
    """generate(prefill_chunk_size=5): the prompt enters the cache in chunks, each attending to the cached
    ones through the continuation-prefill path of the "turboquant" attention."""
    chunks = continuation_calls
    model = model_as("sdpa")
    ids, mask = left_padded_batch((17,))
    ref = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache()))
    model = model_as(attn)
    for kind, factory in _caches().items():
        chunks.clear()
        cache = factory()
        out = model.generate(ids, attention_mask=mask, prefill_chunk_size=5, **greedy_kwargs(N_NEW),
                             **cache_kw(cache))
        assert torch.equal(out, ref), kind
        n_layers = len(cache.layers)
        assert chunks == ([(5, 5)] * n_layers + [(5, 10)] * n_layers + [(2, 15)] * n_layers
                          if attn == "turboquant" else [])


# ------------------------------------------------------------------ output_attentions
def _attentions(model, ids, mask, cache):
    return model.generate(ids, attention_mask=mask, **greedy_kwargs(4), **cache_kw(cache), output_attentions=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("cache_kind", ("dynamic", "exact", "4bit"))
def test_output_attentions_falls_back_to_dense_weights(model_as, cache_kind):
    """"turboquant" with output_attentions=True returns real weights (dense fp32 over the dequantized cache),
    where transformers' sdpa would hand back None and crash generate."""
    ids, mask = left_padded_batch((9, 6))
    ref = _attentions(model_as("eager"), ids, mask, DynamicCache())
    cache = {"dynamic": DynamicCache, "exact": lambda: TurboQuantCache(residual_length=1000),
             "4bit": lambda: TurboQuantCache(residual_length=2)}[cache_kind]()
    out = _attentions(model_as("turboquant"), ids, mask, cache)
    assert len(out.attentions) == len(ref.attentions) == 4
    for step_out, step_ref in zip(out.attentions, ref.attentions):
        for a, b in zip(step_out, step_ref):
            assert a is not None and a.shape == b.shape
            # Rows of padding queries (fully masked) differ by convention (eager: uniform, here: 0): skip them.
            valid = mask.bool()[:, -a.shape[2] :] if a.shape[2] > 1 else torch.ones(a.shape[0], 1, dtype=torch.bool)
            a, b = a.transpose(1, 2)[valid], b.transpose(1, 2)[valid]
            torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
            if cache_kind == "4bit":
                assert (a - b).abs().max() < 0.05  # lossy keys move the probabilities a little
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if cache_kind != "4bit":
        assert torch.equal(out.sequences, ref.sequences)
    else:
        assert cache.layers[0].n_quant > 0 and cache.layers[0].fast_path


# ------------------------------------------------------------------ unpadded softcap prefill (regression)
@pytest.mark.parametrize("with_cache", (False, True))
def test_unpadded_softcap_prefill_is_causal(with_cache):
    """An unpadded batch gets attention_mask=None from the mask function (SDPA would set is_causal). The
    fp32 softcap path once attended to future tokens then (Gemma 2 prompts off by ~0.5 in the logits)."""
    model = make_model("gemma2", "eager", seed=3)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("turboquant")
        kw = cache_kw(TurboQuantCache(residual_length=2)) if with_cache else {}
        out = model(ids, **kw).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref_gen = make_model("gemma2", "eager", seed=3).generate(ids, **greedy_kwargs(6), **cache_kw(DynamicCache()))
    out_gen = model.generate(ids, **greedy_kwargs(6), **cache_kw(TurboQuantCache("8bit", residual_length=1000)))
    assert torch.equal(out_gen, ref_gen)


def test_static_cache_under_turboquant_attention(model_as):
    """The "turboquant" attention with transformers' StaticCache behaves as SDPA (design requirement 3)."""
    ids, mask = left_padded_batch((9, 6))
    model = model_as("sdpa")
    ref = model.generate(ids, attention_mask=mask, **greedy_kwargs(6),
                         **cache_kw(StaticCache(config=model.config, max_cache_len=32)))
    model = model_as("turboquant")
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(6),
                         **cache_kw(StaticCache(config=model.config, max_cache_len=32)))
    assert torch.equal(out, ref)


# ------------------------------------------------------------------ pipeline, device_map, offload hooks
def _tiny_tokenizer():
    """A word-level fast tokenizer over the tiny models' 256 ids ("w3" ... "w255"), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_pipeline_text_generation(model_as, attn):
    from transformers import pipeline

    tokenizer = _tiny_tokenizer()
    prompt = "w5 w17 w99 w3 w42 w7 w8"
    model = model_as("sdpa")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    ref = pipe(prompt, **gen, **cache_kw(DynamicCache()))[0]["generated_text"]
    model = model_as(attn)
    cache = TurboQuantCache(residual_length=1000)
    out = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")(
        prompt, **gen, **cache_kw(cache))[0]["generated_text"]
    assert out == ref and out.startswith(prompt) and out.count("w") == 7 + 8
    assert cache.get_seq_length() == len(tokenizer(prompt)["input_ids"]) + 8 - 1
    assert all(layer.fast_path == (attn == "turboquant") for layer in cache.layers)
    # The default preset through the pipeline, with enough history to quantize.
    cache = TurboQuantCache(residual_length=2)
    out = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")(
        prompt, **gen, **cache_kw(cache))[0]["generated_text"]
    assert out.startswith(prompt) and cache.layers[0].n_quant > 0


def test_device_map_auto(tmp_path, llama):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    llama.save_pretrained(tmp_path)
    ids, mask = left_padded_batch((9, 6))
    ref = llama.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache()))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", attn_implementation="turboquant",
                                                 dtype=torch.float32).eval()
    model.generation_config.pad_token_id = PAD
    for factory in _caches().values():
        cache = factory()
        out = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(cache))
        assert torch.equal(out, ref)
        assert all(layer.fast_path for layer in cache.layers)


def test_accelerate_cpu_offload_hooks(llama):
    """accelerate's hooks (weights on "meta", loaded per forward) around every module: the cache and the
    attention still see one module per layer and the same results."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    ids, mask = left_padded_batch((9, 6))
    ref = llama.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache()))
    model = copy.deepcopy(llama)
    model.set_attn_implementation("turboquant")
    accelerate.cpu_offload(model, execution_device="cpu")
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    for factory in _caches().values():
        cache = factory()
        out = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(cache))
        assert torch.equal(out, ref)
        assert all(layer.fast_path for layer in cache.layers)
