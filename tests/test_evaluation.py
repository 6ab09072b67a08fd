"""Sliding-window perplexity: exactness against direct computations, the use of context, the metric module, and
`hf-lowrank evaluate`."""

import json
import math

import evaluate
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main as cli_main
from hf_lowrank.evaluation import (
    METRIC_PATH,
    evaluate_perplexity,
    perplexity_of_ids,
    sliding_windows,
    tokenize_stream,
)
from hf_lowrank.training.tokenizer import train_bpe_tokenizer

VOCAB = 320
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "for i in range(10):\n    print(i, add(i, i))\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB, max_position_embeddings=64)).eval()


def reference_nll(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of transformers' "perplexity of fixed-length models" guide, one window per forward, with the
    model's own loss; counts the labels that survive the shift."""
    nll_sum, n_tokens, previous_end = 0.0, 0, 0
    ids = input_ids[None]
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        target_length = end - previous_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_length] = -100
        count = int((labels[:, 1:] != -100).sum())
        nll_sum += model(input_ids=window, labels=labels).loss.item() * count
        n_tokens += count
        previous_end = end
        if end == ids.size(1):
            break
    return nll_sum, n_tokens


def copy_model(lag: int, symbols: int = 16) -> LlamaForCausalLM:
    """A stock one-layer Llama whose weights are set by hand so that it needs context: head 0 attends exactly
    ``lag`` positions back (RoPE makes the score peak at that distance) and the LM head predicts the token found
    there. On a stream of period ``lag + 1`` it is right exactly when its window reaches ``lag`` tokens back."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=32,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    )
    model = LlamaForCausalLM(config).eval()
    d, constant = config.head_dim, 2 * symbols
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.zero_()  # MLP and the other heads contribute nothing
        model.model.embed_tokens.weight[:symbols, :symbols] = torch.eye(symbols)  # token identity
        model.model.embed_tokens.weight[:, constant] = 1.0  # same q and k at every position
        attention = model.model.layers[0].self_attn
        inv_freq = model.model.rotary_emb.inv_freq
        angle = -lag * torch.cat([inv_freq, inv_freq])
        key = torch.cat([torch.full((d // 2,), 3.0), torch.zeros(d // 2)])
        attention.k_proj.weight[:d, constant] = key
        # The key rotated to position -lag: <R(m) q, R(n) k> is largest when m - n = lag.
        attention.q_proj.weight[:d, constant] = key * angle.cos() + rotate_half(key) * angle.sin()
        attention.v_proj.weight[:symbols, :symbols] = torch.eye(symbols)
        attention.o_proj.weight[symbols : 2 * symbols, :symbols] = torch.eye(symbols)
        model.lm_head.weight[:symbols, symbols : 2 * symbols] = torch.eye(symbols)
    return model


# ---------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize(
    "num_tokens,max_length,stride", [(50, 16, 16), (50, 16, 4), (50, 16, 15), (16, 16, 8), (7, 16, 8)]
)
def test_windows_score_each_token_at_most_once(num_tokens, max_length, stride):
    windows = sliding_windows(num_tokens, max_length, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored)) and min(scored) >= 1 and windows[-1].end == num_tokens
    assert all(w.end - w.begin <= max_length and w.score_from > w.begin for w in windows)
    if stride < max_length:
        assert sorted(scored) == list(range(1, num_tokens))  # every predictable token, once
        assert all(w.score_from - w.begin >= max_length - stride for w in windows[1:])  # with that much context
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(num_tokens, max_length, max_length + 1)


def test_single_window_equals_one_forward(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, TEXTS)
    ids, documents = tokenize_stream(tokenizer, TEXTS)
    assert documents == 3 and ids.numel() < 64 and ids[-1] == tokenizer.eos_token_id
    assert (result["windows"], result["tokens"], result["input_tokens"]) == (1, ids.numel() - 1, ids.numel())
    loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert (result["max_length"], result["stride"]) == (64, 32)  # model context, half of it


@pytest.mark.parametrize("max_length,stride,batch_size", [(16, 16, 3), (16, 5, 4), (20, 7, 1)])
def test_sliding_window_matches_the_reference_loop(model, max_length, stride, batch_size):
    ids = torch.randint(0, VOCAB, (83,), generator=torch.Generator().manual_seed(0))
    result = perplexity_of_ids(model, ids, max_length, stride, batch_size)
    nll_sum, n_tokens = reference_nll(model, ids, max_length, stride)
    assert result["tokens"] == n_tokens
    assert result["loss"] == pytest.approx(nll_sum / n_tokens, rel=1e-5)


def test_more_context_lowers_perplexity_for_a_model_that_uses_it():
    lag = 6
    model = copy_model(lag)
    period = torch.randint(0, 16, (lag + 1,), generator=torch.Generator().manual_seed(0))
    ids = period.repeat(30)  # (210,)
    non_overlapping = perplexity_of_ids(model, ids, max_length=16, stride=16)
    sliding = perplexity_of_ids(model, ids, max_length=16, stride=4)  # >= 12 tokens of context everywhere
    # Each non-overlapping window misses the lag for its first tokens; sliding windows only in the first window.
    assert sliding["perplexity"] < 0.5 * non_overlapping["perplexity"]
    assert sliding["tokens"] == ids.numel() - 1 > non_overlapping["tokens"]


def test_max_tokens_caps_the_stream(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, TEXTS * 400, max_length=16, stride=8, max_tokens=40)
    assert result["input_tokens"] == 40 and result["tokens"] == 39
    assert result["documents"] < 1200  # reading stopped early


# ---------------------------------------------------------------------------------------------- metric
def test_metric_module_loads_offline_and_weights_by_tokens():
    metric = evaluate.load(str(METRIC_PATH))
    metric.add_batch(nll_sum=[2.0], num_tokens=[1])
    metric.add_batch(nll_sum=[2.0], num_tokens=[4])  # 1 token at loss 2, 4 tokens at loss 0.5
    result = metric.compute()
    assert result["tokens"] == 5 and result["loss"] == pytest.approx(0.8)
    assert result["perplexity"] == pytest.approx(math.exp(0.8))
    with pytest.raises(ValueError, match="No predicted tokens"):
        evaluate.load(str(METRIC_PATH)).compute(nll_sum=[0.0], num_tokens=[0])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate_writes_eval_results(tmp_path, model, tokenizer, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    files = []
    for i, text in enumerate(TEXTS * 2):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    argv = ["evaluate", str(model_dir), "--files", *map(str, files), "--max-length", "24", "--stride", "8"]
    assert cli_main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert {"perplexity", "loss", "tokens", "dataset", "split", "max_length", "stride"} <= set(results)
    expected = evaluate_perplexity(model, tokenizer, TEXTS * 2, max_length=24, stride=8)
    assert results["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert results["tokens"] == expected["tokens"]
    assert (results["dataset"], results["files"]) == ("local files", [f.name for f in files])
    assert (results["split"], results["max_length"], results["stride"]) == (None, 24, 8)

    # The default source is the built-in corpus's held-out split; --output puts the file elsewhere.
    output = tmp_path / "out" / "results.json"
    assert cli_main(["evaluate", str(model_dir), "--max-tokens", "200", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert (results["dataset"], results["split"], results["input_tokens"]) == (
        "python-stdlib (built-in corpus)",
        "validation",
        200,
    )
    assert math.isfinite(results["perplexity"])

    assert cli_main(["evaluate", str(model_dir), "--files", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_token_nll_is_float32_cross_entropy(model):
    # The per-window sums use float32 log-softmax even for half-precision models (here: fp32, same numbers).
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    result = perplexity_of_ids(model, ids, max_length=30, stride=30)
    logits = model(ids[None]).logits[0, :-1]
    assert result["loss"] == pytest.approx(F.cross_entropy(logits.float(), ids[1:]).item(), rel=1e-5)


@pytest.mark.parametrize(
    "flags, fragment",
    [(["--max-length", "1024"], "exceeds the model's max_position_embeddings"), (["--batch_size", "0"], "at least 1")],
)
def test_cli_evaluate_refuses_nonsense_before_writing(tmp_path, model, tokenizer, capsys, flags, fragment):
    """A window past the trained positions would score silently (it used to, with a warning); 0 windows per forward
    pass would crash deep inside. Both: one line, exit 2, no eval_results.json."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert cli_main(["evaluate", str(model_dir), "--max-tokens", "200", *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-lowrank evaluate: error: ") and fragment in error and error.count("\n") == 1
    assert not (model_dir / "eval_results.json").exists()
