"""Dense ⇄ low-rank conversion: Eckart–Young errors, exact copies, logits, round trips, and `hf-lowrank convert`."""

import json

import pytest
import torch
from blocked_package import BLOCK_HF_LOWRANK, run_without_package
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main as cli_main
from hf_lowrank.convert import from_dense, to_dense
from hf_lowrank.training.tokenizer import train_bpe_tokenizer

VOCAB = 320  # the test tokenizer needs >= 258 ids (256 bytes + 2 special tokens)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 8
# rank = min(in, out) - 1 for every projection of `dense_config()`: the closest to full a factorization can be.
NEAR_FULL = {"q_proj": 63, "k_proj": 31, "v_proj": 31, "o_proj": 63, "gate_proj": 63, "up_proj": 63, "down_proj": 63}

# Runs in a fresh interpreter in which any import of hf_lowrank fails: plain transformers must load the folder.
BLOCKED_LOAD = (
    BLOCK_HF_LOWRANK
    + r"""
import sys, json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "logits": model(ids).logits.tolist(), "encoded": tokenizer("def add")["input_ids"]}))
"""
)


def dense_config(**overrides) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=3,
        eos_token_id=4,
        pad_token_id=5,
    )
    return LlamaConfig(**{**fields, **overrides})


def dense_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(dense_config(**overrides)).eval()
    with torch.no_grad():  # norms start at 1; make them distinct so that copying them is actually checked
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def token_ids(seed: int = 1, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([TEXT], vocab_size=300)


# ---------------------------------------------------------------------------------------------- from_dense
@pytest.mark.parametrize("rank_ratio", [0.25, 0.5])
def test_reconstruction_error_is_the_svd_tail(rank_ratio):
    source = dense_llama()
    model, report = from_dense(source, rank_ratio=rank_ratio)
    assert report["lowrank_modules"] == list(LOWRANK_PROJECTIONS)
    assert len(report["layers"]) == 2
    frobenius, spectral = [], []
    for layer in report["layers"]:
        assert list(layer["projections"]) == list(LOWRANK_PROJECTIONS)
        for projection, stats in layer["projections"].items():
            group = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer['layer']}.{group}.{projection}"
            weight = source.get_submodule(name).weight
            r = stats["rank"]
            assert r == model.config.rank_for(projection) == int(rank_ratio * min(weight.shape))
            assert stats["shape"] == list(weight.shape)
            # Eckart–Young: the best rank-r error is the tail of the singular values.
            s = torch.linalg.svdvals(weight.detach().double())
            assert stats["relative_frobenius_error"] == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-4)
            assert stats["relative_spectral_error"] == pytest.approx(float(s[r] / s[0]), rel=1e-4)
            merged = model.get_submodule(name).merged_weight()
            assert torch.linalg.matrix_rank(merged).item() == r
            frobenius.append(stats["relative_frobenius_error"])
            spectral.append(stats["relative_spectral_error"])
    summary = report["summary"]
    assert summary["relative_frobenius_error"]["mean"] == pytest.approx(sum(frobenius) / len(frobenius))
    assert summary["relative_frobenius_error"]["max"] == max(frobenius)
    assert summary["relative_spectral_error"]["max"] == max(spectral)
    assert report["parameters"]["converted"] < report["parameters"]["source"]
    json.dumps(report)  # JSON-ready


def test_dense_tensors_and_config_fields_are_copied_exactly():
    source = dense_llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model, _ = from_dense(source, rank_ratio=0.5, lowrank_modules=["q_proj", "gate_proj", "down_proj"])
    config = model.config
    assert config.model_type == "lowrank_llama"
    assert config.rope_theta == 500000.0
    for field in ("head_dim", "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(source.config, field), field
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (3, 4, 5)
    lowrank = {n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert len(lowrank) == 2 * 3
    copied = 0
    for name, param in source.named_parameters():
        module = name.rpartition(".")[0]
        if module in lowrank:
            if name.endswith("bias"):  # a factorized projection's bias lives on `up`
                assert torch.equal(model.get_parameter(f"{module}.up.bias"), param)
            continue
        assert torch.equal(model.get_parameter(name), param), name
        copied += 1
    assert copied > 10  # embeddings, lm_head, norms, dense projections and their biases


def test_logits_approach_the_original_as_the_rank_approaches_full():
    source = dense_llama()
    ids = token_ids()
    reference = source(ids).logits
    gaps = []
    for options in (dict(rank_ratio=0.25), dict(rank_ratio=0.5), dict(rank_overrides=NEAR_FULL)):
        model, report = from_dense(source, **options)
        gaps.append((model(ids).logits - reference).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2]
    # Random weights have a flat spectrum, so dropping even one singular value shows; still far below rank 1/4.
    assert gaps[2] < 0.15 * gaps[0]
    assert report["summary"]["relative_frobenius_error"]["max"] < 0.1


def test_refuses_what_the_lowrank_model_cannot_represent():
    scaled = dense_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        from_dense(scaled)
    lowrank = LowRankLlamaForCausalLM(preset_config("tiny"))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        from_dense(lowrank)
    with pytest.raises(ValueError, match="rank of `k_proj`"):
        from_dense(dense_llama(), rank=40)  # k_proj is 64 -> 32


# ---------------------------------------------------------------------------------------------- to_dense
@pytest.mark.parametrize("tie", [False, True])
def test_to_dense_gives_a_stock_llama_with_the_same_logits(tie):
    torch.manual_seed(0)
    config = preset_config(
        "tiny", vocab_size=VOCAB, tie_word_embeddings=tie, rope_theta=1234.0, rank_overrides={"down_proj": 20}
    )
    config.lowrank_modules = [m for m in LOWRANK_PROJECTIONS if m != "v_proj"]  # v_proj stays dense
    lowrank = LowRankLlamaForCausalLM(config).eval()
    dense = to_dense(lowrank)
    assert type(dense) is LlamaForCausalLM
    assert dense.config.model_type == "llama"
    assert dense.config.rope_parameters == {"rope_type": "default", "rope_theta": 1234.0}
    assert dense.config.num_key_value_heads == 2 and dense.config.tie_word_embeddings is tie
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) is tie
    ids = token_ids()
    torch.testing.assert_close(dense(ids).logits, lowrank(ids).logits, atol=1e-5, rtol=0)
    layer = lowrank.model.layers[1].mlp.down_proj
    assert torch.equal(dense.model.layers[1].mlp.down_proj.weight, layer.up.weight @ layer.down.weight)


def test_round_trips():
    # dense -> low-rank (near full) -> dense: the product is the truncated SVD of the original.
    source = dense_llama()
    lowrank, report = from_dense(source, rank_overrides=NEAR_FULL)
    back = to_dense(lowrank)
    for name, param in source.named_parameters():
        error = (back.get_parameter(name) - param).norm() / param.norm()
        assert error < 0.1, name
    assert (back(token_ids()).logits - source(token_ids()).logits).abs().max() < 0.05
    # low-rank -> dense -> low-rank at the same ranks is exact: the dense weights have rank r.
    torch.manual_seed(0)
    original = LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB)).eval()
    again, report = from_dense(to_dense(original), rank_ratio=original.config.rank_ratio)
    assert report["summary"]["relative_frobenius_error"]["max"] < 1e-5
    torch.testing.assert_close(again(token_ids()).logits, original(token_ids()).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_from_dense_with_perplexity_and_refusals(tmp_path, tokenizer, capsys):
    source_dir, destination = tmp_path / "dense", tmp_path / "lowrank"
    source = dense_llama()
    source.save_pretrained(source_dir)
    tokenizer.save_pretrained(source_dir)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(TEXT)
    argv = ["convert", "--from-dense", str(source_dir), str(destination), "--rank-ratio", "0.5"]
    assert cli_main([*argv, "--eval-files", str(held_out), "--stride", "16"]) == 0
    out = capsys.readouterr().out
    assert "q_proj (r=32)" in out and "held-out perplexity" in out

    report = json.loads((destination / "conversion_report.json").read_text())
    assert report["direction"] == "dense_to_lowrank" and report["source"] == str(source_dir)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    ppl = report["perplexity"]
    assert ppl["before"]["tokens"] == ppl["after"]["tokens"] > 0 and ppl["before"]["stride"] == 16
    assert ppl["after"]["perplexity"] != ppl["before"]["perplexity"]
    assert (destination / "model.safetensors").exists() and (destination / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(destination).eval()
    assert type(loaded) is LowRankLlamaForCausalLM
    expected, _ = from_dense(source, rank_ratio=0.5)
    torch.testing.assert_close(loaded(token_ids()).logits, expected(token_ids()).logits, atol=1e-6, rtol=0)

    # A non-empty destination is refused and left as it was; --overwrite writes into it.
    before = {p.name: p.read_bytes() for p in destination.iterdir() if p.is_file()}
    assert cli_main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in destination.iterdir() if p.is_file()} == before
    assert cli_main([*argv, "--overwrite"]) == 0

    # A missing source and a source of the wrong kind are refused with a message.
    assert cli_main(["convert", "--from-dense", str(tmp_path / "nope"), str(tmp_path / "out1")]) == 2
    assert "Cannot load a model config" in capsys.readouterr().err
    assert cli_main(["convert", "--from-dense", str(destination), str(tmp_path / "out2")]) == 2
    assert "is not a Llama model" in capsys.readouterr().err
    assert cli_main(["convert", "--to-dense", str(source_dir), str(tmp_path / "out3")]) == 2
    assert "is not a low-rank model" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("out1", "out2", "out3"))


@pytest.mark.slow
def test_cli_to_dense_loads_with_plain_transformers(tmp_path, tokenizer):
    torch.manual_seed(0)
    lowrank = LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB, eos_token_id=0)).eval()
    source_dir, destination = tmp_path / "lowrank", tmp_path / "dense"
    lowrank.save_pretrained(source_dir)
    tokenizer.save_pretrained(source_dir)
    assert cli_main(["convert", "--to-dense", str(source_dir), str(destination)]) == 0
    assert json.loads((destination / "config.json").read_text())["model_type"] == "llama"
    assert not list(destination.glob("*.py"))  # no custom code travels with the dense model
    assert json.loads((destination / "conversion_report.json").read_text())["direction"] == "lowrank_to_dense"

    ids = token_ids()
    payload = run_without_package(BLOCKED_LOAD, str(destination), json.dumps(ids.tolist()), cwd=tmp_path)
    assert payload["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(payload["logits"]), lowrank(ids).logits, atol=1e-5, rtol=0)
    assert payload["encoded"] == tokenizer("def add")["input_ids"]


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_cli_to_dense_refuses_weights_that_do_not_fit_their_config(tmp_path, capsys, damage):
    """A folder missing one tensor was converted with exit 0 into a dense model with a random q_proj (from_pretrained
    only warns); a mis-shaped one gave a traceback. Both: exit 2, one line naming the tensor, nothing written."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    source_dir, destination = tmp_path / "lowrank", tmp_path / "dense"
    LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB)).save_pretrained(source_dir)
    tensors = load_file(source_dir / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.up.weight"
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, source_dir / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["convert", "--to-dense", str(source_dir), str(destination)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-lowrank convert: error: ") and error.count("\n") == 1, error[-2000:]
    assert "do not fit its config" in error and "q_proj" in error
    assert not destination.exists()


@pytest.mark.parametrize("command", ["convert", "evaluate"])
def test_pickled_weights_are_refused_unopened_in_one_line(tmp_path, capsys, command):
    """A folder whose weights are a pickle (`pytorch_model.bin` carrying a payload): refused before it is opened, in
    one line that never suggests `weights_only=False` (which would run the payload); the payload never runs."""
    import os

    torch.manual_seed(0)
    source = tmp_path / "lowrank"
    LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB)).save_pretrained(source)
    os.remove(source / "model.safetensors")
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Payload()}, source / "pytorch_model.bin")
    argv = ["convert", "--to-dense", str(source), str(tmp_path / "dense")] if command == "convert" else [
        "evaluate", str(source), "--max-tokens", "100"]  # fmt: skip
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"hf-lowrank {command}: error: ") and error.count("\n") == 1, error[-2000:]
    assert "pytorch_model.bin" in error and "weights_only=False" not in error and "Traceback" not in error
    assert not marker.exists() and not (tmp_path / "dense").exists()


@pytest.mark.parametrize("command", ["convert", "evaluate"])
def test_a_garbage_weights_file_is_named_in_one_line(tmp_path, capsys, command):
    torch.manual_seed(0)
    source = tmp_path / "lowrank"
    LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=VOCAB)).save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 10)
    argv = ["convert", "--to-dense", str(source), str(tmp_path / "dense")] if command == "convert" else [
        "evaluate", str(source), "--max-tokens", "100"]  # fmt: skip
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"hf-lowrank {command}: error: ") and error.count("\n") == 1, error[-2000:]
    assert "model.safetensors is not a readable safetensors file" in error


def test_evaluate_refuses_a_tokenizer_larger_than_the_model(tmp_path, capsys, tokenizer):
    """Ids past the embedding were an IndexError in the middle of scoring."""
    torch.manual_seed(0)
    source = tmp_path / "lowrank"
    LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=len(tokenizer) // 2)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert cli_main(["evaluate", str(source), "--max-tokens", "100"]) == 2
    error = capsys.readouterr().err
    assert f"The tokenizer has {len(tokenizer)} tokens but the model's embedding holds" in error
    assert error.count("\n") == 1 and not (source / "eval_results.json").exists()
