"""Stage "instruct": questions CSV, prompt templates, token sequences, visual splicing, and the
stage end to end on a tiny align run (8 fake devices), with LoRA and the Gemma recipe."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import config_args, tokenizer as tokenizer_lib, train
from pathflip_jax.data import instructions as ins
from pathflip_jax.models import decoder, instruct
from tests import runs, test_align

FIELDS = list(ins.COLUMNS)


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k, "") for k in FIELDS})
  return str(path)


def _mc(slide_id, split, answer="B", options=("fat", "tumour", "necrosis", "stroma"),
        category="presence"):
  return {"slide_id": slide_id, "split": split, "category": category,
          "question": "Which tissue is present?", **dict(zip("ABCD", options)), "answer": answer,
          "answer_text": options["ABCD".index(answer)], "type": "multiple_choice"}


# ------------------------------------------------------------------------------ questions


def test_read_questions_parses_both_types(tmp_path):
  path = _write_csv(tmp_path / "q.csv", [
      _mc("s1", "train"),
      {"slide_id": "s1", "split": "train", "category": "diagnosis",
       "question": "What is the diagnosis?", "answer_text": "benign", "type": "open"}])
  mc, open_q = ins.read_questions(path)
  assert mc.options == ("fat", "tumour", "necrosis", "stroma") and mc.answer == "B"
  assert mc.correct_text == "tumour"
  assert open_q.options == () and open_q.correct_text == "benign" and open_q.type == ins.OPEN


@pytest.mark.parametrize("row, message", [
    (dict(_mc("s1", "train"), type="mcq"), "type='mcq'"),
    (dict(_mc("s1", "train"), answer="E"), "answer='E'"),
    (dict(_mc("s1", "train"), C=""), "needs options A-D"),
    ({"slide_id": "s1", "question": "Why?", "type": "open"}, "needs answer_text"),
])
def test_read_questions_errors_name_file_and_line(tmp_path, row, message):
  path = _write_csv(tmp_path / "q.csv", [_mc("s0", "train"), row])
  with pytest.raises(ValueError, match=f"q.csv:3: .*{message}"):
    ins.read_questions(path)


def test_template_renders_and_shuffles_options():
  template = ins.Template(answer_format="letter_text")
  item = ins.Instruction(slide=0, kind=ins.MULTIPLE_CHOICE, question="Which?",
                         options=("fat", "tumour", "necrosis", "stroma"), answer="B",
                         answer_text="tumour")
  prompt, answer, shown, letter = ins.render(item, template, None)
  assert prompt == "<image>\nQuestion: Which?\nA. fat\nB. tumour\nC. necrosis\nD. stroma\nAnswer:"
  assert answer == "B. tumour" and letter == "B" and shown == item.options
  letters = set()
  for seed in range(20):
    _, answer, shown, letter = ins.render(item, template, np.random.default_rng(seed))
    assert shown["ABCD".index(letter)] == "tumour" and answer == f"{letter}. tumour"
    letters.add(letter)
  assert letters == set("ABCD")
  assert ins.Template(answer_format="text").choice_answer("C", "fat") == "fat"
  with pytest.raises(ValueError, match="<image> once"):
    ins.Template(prompt="{question}")
  with pytest.raises(ValueError, match="answer_format"):
    ins.Template(answer_format="word")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tok")
  texts = ["Question: Which tissue is present? Answer: fat tumour necrosis stroma",
           "Describe the slide. Benign glands are seen in the upper left."] * 20
  return tokenizer_lib.Tokenizer(tokenizer_lib.train(texts, str(directory / "t"), vocab_size=300))


def test_training_example_masks_only_the_answer(tokenizer):
  template = ins.Template(answer_format="text")
  item = ins.Instruction(slide=0, kind=ins.OPEN, question="Which tissue is present?",
                         answer_text="fat")
  visual = {"tokens": np.ones((3, 4), np.float32), "positions": np.zeros((3, 3), np.float32)}
  config = ins.SequenceConfig(max_len=100, max_visual=5)
  ex = ins.training_example(item, visual, template, tokenizer, config, None)
  prompt_ids = ins.encode_prompt(tokenizer, template.prompt_text(item.question), 3)
  answer_ids = tokenizer.encode("fat") + [tokenizer.eos_id]
  assert prompt_ids[0] == tokenizer.bos_id and prompt_ids.count(tokenizer.image_id) == 3
  n = len(prompt_ids) + len(answer_ids) - 1
  assert ex["length"] == n
  np.testing.assert_array_equal(ex["tokens"][:n], (prompt_ids + answer_ids)[:-1])
  np.testing.assert_array_equal(ex["targets"][ex["loss_mask"]], answer_ids)
  assert ex["visual_valid"].tolist() == [True] * 3 + [False] * 2
  batch = ins.collate([ex, ex])
  assert batch["tokens"].shape == (2, -(-n // 64) * 64) and "length" not in batch
  short = ins.collate([dict(ex, tokens=np.zeros(200, np.int32), targets=np.zeros(200, np.int32),
                            loss_mask=np.zeros(200, bool))] * 2)
  assert short["tokens"].shape == (2, ins.LENGTH_BUCKET)
  with pytest.raises(ValueError, match="does not fit data.max_len"):
    ins.training_example(item, visual, template, tokenizer,
                         ins.SequenceConfig(max_len=8, max_visual=5), None)


# ------------------------------------------------------------------------------ model

def test_visual_tokens_are_spliced_in_order():
  config = decoder.get_config("tiny", vocab_size=20)
  image_id = 20                                  # one past the vocabulary, as with Gemma
  model = instruct.InstructModel(config, visual_dim=6, image_id=image_id, rngs=nnx.Rngs(0))
  tokens = jnp.array([[2, 5, image_id, image_id, image_id, 7, 0],
                      [2, image_id, image_id, 9, 9, 9, 0]])
  visual = jax.random.normal(jax.random.key(1), (2, 3, 6))
  pos = jnp.zeros((2, 3, 3))

  @nnx.jit
  def run(model):
    logits = model(tokens, visual, pos)
    return (model.input_embeddings(tokens, visual, pos), model.project(visual, pos),
            model.decoder.embed(jnp.array([7]))[0], logits,
            instruct.answer_loss(logits, tokens, tokens == 9))

  out, projected, embed7, logits, (loss, metrics) = run(model)
  np.testing.assert_allclose(out[0, 2:5], projected[0], rtol=1e-6)
  np.testing.assert_allclose(out[1, 1:3], projected[1, :2], rtol=1e-6)
  np.testing.assert_allclose(out[0, 5], embed7, rtol=1e-6)
  assert logits.shape == (2, 7, 20) and np.isfinite(np.asarray(logits)).all()
  # Targets at unmasked slots include the out-of-vocabulary image id: the loss stays finite.
  assert metrics["answer_tokens"] == 3 and np.isfinite(loss)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
  """A tiny finished align run and a questions CSV for its slides."""
  root = tmp_path_factory.mktemp("instruct")
  rows = test_align.write_features(root / "features")
  config = config_args.load_config(
      f"configs/pathflip_demo.py:size=test,features_dir={root / 'features'}",
      {"total_steps": 2, "log_steps": 2, "input.worker_count": 0})
  # What stage instruct reads of an align run: config.json, tokenizer, checkpoint (an untrained
  # model will do; the align stage's own training is tested in test_align.py).
  runs.save_untrained_run(config, str(root / "align"), step=2)
  questions = []
  for i, row in enumerate(rows):
    options = list(test_align.CLASSES)
    questions.append(_mc(row["slide_id"], row["split"], answer="ABCD"[options.index(
        row["diagnosis"])], options=options, category="diagnosis"))
    questions.append({"slide_id": row["slide_id"], "split": row["split"],
                      "category": "diagnosis", "question": "What is the diagnosis?",
                      "answer_text": row["diagnosis"], "type": "open"})
  _write_csv(root / "questions.csv", questions)
  return root


def _instruct_config(root, extra=""):
  return config_args.load_config(
      f"configs/pathflip_instruct_demo.py:size=test,align_workdir={root / 'align'},"
      f"questions={root / 'questions.csv'},eval_split=val{extra}",
      {"total_steps": 3, "log_steps": 3, "evals.captioning.max_new_tokens": 8,
       "evals.vqa.description_tokens": 8})


@pytest.mark.slow
def test_instruct_trains_and_evaluates_on_8_devices(align_run, tmp_path):
  config = _instruct_config(align_run)
  workdir = str(tmp_path / "w")
  results = train.train_and_evaluate(config, workdir)
  for key in ("captioning/bleu_1", "captioning/cider_d", "captioning/rouge_l",
              "captioning/random_train_caption/bleu_1", "vqa/mc/accuracy",
              "vqa/mc/ranked_accuracy", "vqa/mc/best_single_letter_accuracy",
              "vqa/mc/accuracy/diagnosis", "vqa/open/exact_match", "vqa/open/f1"):
    assert key in results and np.isfinite(results[key]), key
  assert results["vqa/mc/num_questions"] == 4 and results["captioning/num_captions"] == 4
  predictions = [json.loads(line) for line in open(os.path.join(workdir, "eval",
                                                                 "vqa_val.jsonl"))]
  assert {p["type"] for p in predictions} == {"multiple_choice", "open"}
  assert len(predictions) == 8 and all(p["slide_id"].startswith("val-") for p in predictions)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any(0 < r.get("train/answer_tokens", 0) for r in rows)


def test_missing_align_run_and_bad_questions_are_clear_errors(align_run, tmp_path):
  from pathflip_jax.tasks import instruct as instruct_task
  with pytest.raises(FileNotFoundError, match="config.align_workdir=.*not a training workdir"):
    instruct_task.InstructTask(config_args.load_config(
        f"configs/pathflip_instruct_demo.py:size=test,align_workdir={tmp_path}"), str(tmp_path))
  moved = _write_csv(tmp_path / "q.csv", [_mc("train-0-0", "test")])
  with pytest.raises(ValueError, match="differs from the align run's"):
    instruct_task.InstructTask(_instruct_config(align_run, f",questions={moved}"),
                               str(tmp_path / "w"))


@pytest.mark.slow
def test_gemma_recipe_trains_only_lora_and_projector(align_run, tmp_path):
  """configs/pathflip_instruct_gemma.py on a tiny random Gemma 3 checkpoint written by
  save_gemma: the imported decoder stays as imported, adapters and projector train."""
  from pathflip_jax import checkpointing
  from pathflip_jax.convert import gemma

  texts = [f"Question: What is the diagnosis? Answer: {c}. Describe the slide." for c in
           test_align.CLASSES] * 10 + [w for w in test_align.WORDS.values()] * 10
  tok_path = tokenizer_lib.train(texts, str(tmp_path / "tok"), vocab_size=320)
  tok = tokenizer_lib.Tokenizer(tok_path)
  base = decoder.Decoder(decoder.get_config("tiny", vocab_size=tok.num_embeddings,
                                            sliding_window=512, max_len=512),
                         rngs=nnx.Rngs(3))
  gemma.save_gemma(base, str(tmp_path / "gemma"), model_type="gemma3_text",
                   tokenizer_path=tok_path)
  config = config_args.load_config(
      f"configs/pathflip_instruct_gemma.py:gemma={tmp_path / 'gemma'},"
      f"align_workdir={align_run / 'align'},questions={align_run / 'questions.csv'},"
      "lora_rank=2,eval_split=", {"total_steps": 2, "log_steps": 2, "dtype": "float32"})
  workdir = str(tmp_path / "w")
  results = train.train_and_evaluate(config, workdir)
  assert "decoder initialised from gemma3_text checkpoint" in results["origin"]
  trained = checkpointing.load_params(workdir)
  imported = checkpointing.named_leaves(nnx.state(base, nnx.Param))
  for name, value in imported.items():
    np.testing.assert_array_equal(trained[f"decoder/{name}"], np.asarray(value), err_msg=name)
  lora_b = [k for k in trained if "lora" in k and k.endswith("/b")]
  assert lora_b and all(np.abs(trained[k]).max() > 0 for k in lora_b)   # zero at the start
