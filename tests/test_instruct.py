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

def test_flip_mirrors_region_positions_and_location_words(tokenizer):
  config = ins.SequenceConfig(max_len=100, max_visual=5, flip=True, shuffle_options=False)
  assert (ins.swap_words("In the upper left; on the Right side. Leftover lower part.",
                         [("left", "right"), ("upper", "lower")])
          == "In the lower right; on the Left side. Leftover upper part.")
  pos = np.array([[1.0, 0.5, 0.5], [0.0, 0.2, 0.9], [0.0, 0.7, 0.1]], np.float32)
  prompt, answer, flipped = ins.flip_example("Is it upper left?", "on the left side", pos,
                                             config, horizontal=True, vertical=False)
  assert (prompt, answer) == ("Is it upper right?", "on the right side")
  np.testing.assert_allclose(flipped, [[1.0, 0.5, 0.5], [0.0, 0.8, 0.9], [0.0, 0.3, 0.1]])
  _, answer, flipped = ins.flip_example("", "in the upper left", pos, config, True, True)
  assert answer == "in the lower right"
  np.testing.assert_allclose(flipped[1:, 1:], 1.0 - pos[1:, 1:])
  # In training, the four orientations all occur; the text and positions always agree.
  item = ins.Instruction(slide=0, kind=ins.OPEN, question="Where is the fat?",
                         answer_text="In the upper left.")
  visual = {"tokens": np.ones((3, 4), np.float32), "positions": pos}
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(40):
    ex = ins.training_example(item, visual, ins.Template(), tokenizer, config, rng)
    answer = tokenizer.decode(ex["targets"][ex["loss_mask"]][:-1].tolist())
    x_flipped, y_flipped = ex["visual_pos"][1, 1] > 0.5, ex["visual_pos"][1, 2] < 0.5
    expected = {(False, False): "upper left", (True, False): "upper right",
                (False, True): "lower left", (True, True): "lower right"}[(x_flipped, y_flipped)]
    assert expected in answer
    seen.add(expected)
  assert len(seen) == 4
  # Evaluation (no rng) never flips.
  ex = ins.training_example(item, visual, ins.Template(), tokenizer, config, None)
  np.testing.assert_array_equal(ex["visual_pos"][:3], pos)


def test_visual_noise_is_relative_to_each_token_and_training_only(tokenizer):
  config = ins.SequenceConfig(max_len=100, max_visual=5, visual_noise=0.5)
  item = ins.Instruction(slide=0, kind=ins.OPEN, question="Where is the fat?", answer_text="fat")
  tokens = np.concatenate([np.ones((1, 256)), 10 * np.ones((2, 256))]).astype(np.float32)
  visual = {"tokens": tokens, "positions": np.zeros((3, 3), np.float32)}
  ex = ins.training_example(item, visual, ins.Template(), tokenizer, config,
                            np.random.default_rng(0))
  noise = ex["visual"][:3] - tokens
  np.testing.assert_allclose(np.sqrt((noise ** 2).mean(-1)), [0.5, 5.0, 5.0], rtol=0.15)
  np.testing.assert_array_equal(ex["visual"][3:], 0.0)        # padding stays zero
  ex = ins.training_example(item, visual, ins.Template(), tokenizer, config, None)
  np.testing.assert_array_equal(ex["visual"][:3], tokens)


def test_slide_dropout_hides_only_the_slide_token_and_only_in_training(tokenizer):
  config = ins.SequenceConfig(max_len=100, max_visual=5, slide_dropout=0.5,
                              shuffle_options=False)
  item = ins.Instruction(slide=0, kind=ins.OPEN, question="Where is the fat?", answer_text="fat")
  tokens = np.arange(12, dtype=np.float32).reshape(3, 4)
  pos = np.array([[1.0, 0.5, 0.5], [0.0, 0.2, 0.9], [0.0, 0.7, 0.1]], np.float32)
  visual = {"tokens": tokens, "positions": pos}
  rng = np.random.default_rng(0)
  shown = []
  for _ in range(200):
    ex = ins.training_example(item, visual, ins.Template(), tokenizer, config, rng)
    v = int(ex["visual_valid"].sum())
    assert (ex["tokens"] == tokenizer.image_id).sum() == v      # one slot per shown token
    np.testing.assert_array_equal(ex["visual"][:v], tokens[3 - v:])
    np.testing.assert_array_equal(ex["visual_pos"][:v, 0], [1.0] * (v == 3) + [0.0, 0.0])
    shown.append(v)
  assert set(shown) == {2, 3} and 0.4 < np.mean(np.array(shown) == 2) < 0.6
  ex = ins.training_example(item, visual, ins.Template(), tokenizer, config, None)
  assert ex["visual_valid"].sum() == 3
  with pytest.raises(ValueError, match="data.slide_dropout"):
    ins.SequenceConfig(slide_dropout=1.0)



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
      f"configs/pathflip_demo.py:size=test,features_dir={root / 'features'},total_steps=2,"
      "batch_size=8,log_steps=2,workers=0")
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
      f"questions={root / 'questions.csv'},total_steps=3,batch_size=8,log_steps=3,"
      f"eval_split=val,caption_tokens=8,answer_tokens=4{extra}")


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
      "total_steps=2,batch_size=8,log_steps=2,lora_rank=2,dtype=float32,eval_split=,"
      "caption_tokens=8,answer_tokens=4")
  workdir = str(tmp_path / "w")
  results = train.train_and_evaluate(config, workdir)
  assert "decoder initialised from gemma3_text checkpoint" in results["origin"]
  trained = checkpointing.load_params(workdir)
  imported = checkpointing.named_leaves(nnx.state(base, nnx.Param))
  for name, value in imported.items():
    np.testing.assert_array_equal(trained[f"decoder/{name}"], np.asarray(value), err_msg=name)
  lora_b = [k for k in trained if "lora" in k and k.endswith("/b")]
  assert lora_b and all(np.abs(trained[k]).max() > 0 for k in lora_b)   # zero at the start


class _StripedTruth:
  """Stands in for ``demo_annotations.CohortAnnotations``: a patch's "tissue fractions" are its
  column and row on the slide (so a region's mean differs from any one patch's), and the slide's
  index in its last column."""

  def __init__(self):
    self.seen = []

  def tissue_fractions(self, slide_id, coords_n2, size):
    self.seen.append(slide_id)
    col, row = coords_n2[:, 0] / size, coords_n2[:, 1] / size
    out = np.zeros((len(coords_n2), 6), np.float32)
    out[:, 0], out[:, 1], out[:, 5] = col, row, len(self.seen)
    return out


def test_truth_tokens_are_each_regions_mean_fractions_in_place(align_run, tmp_path):
  from pathflip_jax import sharding
  from pathflip_jax.tasks import instruct as instruct_task
  align_task, model = instruct_task.load_align_run(str(align_run / "align"), "")
  mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
  visual = instruct_task.encode_visual_tokens(align_task, model, mesh, 8)
  truth = _StripedTruth()
  replaced = instruct_task.truth_visual_tokens(visual, align_task, truth)
  per_region = align_task.example_config.region_patches
  checked = 0
  for split, slides in replaced.items():
    source, examples = align_task.source(split), align_task.eval_examples(split)
    for i, (before, after) in enumerate(zip(visual[split], slides)):
      np.testing.assert_array_equal(after["positions"], before["positions"])
      tokens_ve = after["tokens"]
      scale = np.sqrt(tokens_ve.shape[1])
      coords = np.asarray(source[i]["coords"])
      size = source[i]["patch_size_level0"]
      cells_n2 = coords // (size * per_region)       # the fixture's grids start at (0, 0)
      valid = np.asarray(examples[i]["region_valid"], bool)
      assert len(tokens_ve) == 1 + valid.sum()
      for row, cell in enumerate(np.asarray(examples[i]["region_pos"])[valid], start=1):
        members = (cells_n2 == cell).all(axis=1)
        expected = np.array([coords[members, 0].mean() / size, coords[members, 1].mean() / size])
        np.testing.assert_allclose(tokens_ve[row, :2] / scale, expected, rtol=1e-5)
        assert tokens_ve[row, 6] == 0 and not tokens_ve[row, 7:].any()
        checked += 1
      assert tokens_ve[0, 6] == pytest.approx(scale)                # the slide token's marker
      assert tokens_ve[0, 5] == pytest.approx(tokens_ve[1, 5])      # one slide, one index
  assert checked > 20 and len(truth.seen) == sum(len(v) for v in visual.values())
  with pytest.raises(FileNotFoundError, match="not a demo cohort"):
    instruct_task.InstructTask(_instruct_config(align_run, f",truth_tokens={tmp_path}"),
                               str(tmp_path / "w"))
