"""Llama's task heads (sequence/token classification, question answering) through their Auto classes, pipelines and
`Trainer`; the base model through the feature-extraction pipeline; label smoothing with the labels shifted."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
)
from transformers.trainer_pt_utils import LabelSmoother

from hf_lowrank import (
    LowRankLlamaForCausalLM,
    LowRankLlamaForQuestionAnswering,
    LowRankLlamaForSequenceClassification,
    LowRankLlamaForTokenClassification,
    LowRankLlamaModel,
    preset_config,
)
from hf_lowrank.training.trainer import LowRankTrainer

WORDS = "the a cat dog sat on mat who where what is was ran fast slow red blue green big small".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def head_config(**extra):
    return preset_config("tiny", pad_token_id=0, num_labels=3, **extra)


HEADS = {
    "AutoModelForSequenceClassification": LowRankLlamaForSequenceClassification,
    "AutoModelForTokenClassification": LowRankLlamaForTokenClassification,
    "AutoModelForQuestionAnswering": LowRankLlamaForQuestionAnswering,
}
AUTO = {
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
    "AutoModelForTokenClassification": AutoModelForTokenClassification,
    "AutoModelForQuestionAnswering": AutoModelForQuestionAnswering,
}


@pytest.mark.parametrize("auto_name", sorted(HEADS))
def test_heads_load_through_their_auto_classes(auto_name, tmp_path):
    torch.manual_seed(0)
    model = HEADS[auto_name](head_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AUTO[auto_name].from_pretrained(tmp_path).eval()
    assert type(loaded) is HEADS[auto_name]
    ids = torch.randint(2, 20, (2, 7))
    for key, value in model(ids).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded(ids)[key]), key
    # the base model of a saved head loads on its own, and a causal LM's folder loads as a head (new score)
    assert type(AutoModel.from_pretrained(tmp_path)) is LowRankLlamaModel


def test_pipelines():
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    classifier = pipeline(
        "text-classification", model=LowRankLlamaForSequenceClassification(head_config()), tokenizer=tokenizer
    )
    result = classifier(["the cat sat on the mat", "a dog ran"])
    assert len(result) == 2 and {r["label"] for r in result} <= {"LABEL_0", "LABEL_1", "LABEL_2"}

    tagger = pipeline(
        "token-classification", model=LowRankLlamaForTokenClassification(head_config()), tokenizer=tokenizer
    )
    tags = tagger("the big red dog ran fast")
    assert [t["word"] for t in tags] == [w for w in "the big red dog ran fast".split()][: len(tags)]

    # transformers 5 removed the question-answering pipeline; the QA head is checked against Llama's and with Trainer

    extractor = pipeline("feature-extraction", model=LowRankLlamaModel(head_config()), tokenizer=tokenizer)
    features = torch.tensor(extractor("the cat sat"))
    assert features.shape == (1, 3, head_config().hidden_size)


def _example(auto_name, i, generator):
    ids = torch.randint(2, 20, (6,), generator=generator)
    if auto_name == "AutoModelForSequenceClassification":
        return {"input_ids": ids, "labels": i % 3}
    if auto_name == "AutoModelForTokenClassification":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (6,), generator=generator)}
    return {"input_ids": ids, "start_positions": i % 3, "end_positions": 3 + i % 3}


@pytest.mark.parametrize("auto_name", sorted(HEADS))
def test_heads_train_with_trainer(auto_name, tmp_path):
    torch.manual_seed(0)
    model = HEADS[auto_name](head_config())
    generator = torch.Generator().manual_seed(0)
    data = [_example(auto_name, i, generator) for i in range(8)]
    head = "qa_outputs" if auto_name == "AutoModelForQuestionAnswering" else "score"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before[f"{head}.weight"], model.get_submodule(head).weight)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.up.weight"], model.model.layers[0].mlp.up_proj.up.weight)


# ---------------------------------------------------------------- 6. label smoothing
def _label_smoothing_losses(trainer_cls, tmp_path):
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny")).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.1, report_to=[])
    trainer = trainer_cls(model=model, args=args)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids.clone()})
        outputs = model(input_ids=ids)
        shifted = LabelSmoother(epsilon=0.1)(outputs, ids, shift_labels=True)
        unshifted = LabelSmoother(epsilon=0.1)(outputs, ids)
    return loss, shifted, unshifted


@pytest.mark.parametrize("trainer_cls", [Trainer, LowRankTrainer])
def test_label_smoothing_shifts_the_labels(trainer_cls, tmp_path):
    loss, shifted, unshifted = _label_smoothing_losses(trainer_cls, tmp_path)
    assert not torch.isclose(shifted, unshifted)
    torch.testing.assert_close(loss, shifted)


def test_causal_lm_name_registration_leaves_auto_mappings_working():
    from transformers import LlamaConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["lowrank_llama"] == "LowRankLlamaForCausalLM"
    assert len(MODEL_FOR_CAUSAL_LM_MAPPING.keys()) == len(MODEL_FOR_CAUSAL_LM_MAPPING)
    tiny_llama = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
    )
    assert type(AutoModelForCausalLM.from_config(tiny_llama)).__name__ == "LlamaForCausalLM"
