r"""PathFLIP alignment on the demo cohort (stage "align"), small enough for 2 CPU cores.

  python -m pathflip_jax.train --workdir W/align \
      --config configs/pathflip_demo.py:features_dir=W/features,cohort_dir=W/cohort \
      [--config.region_loss=False] [--config.seed=1]

The features come from configs/patch_clip_demo.py's patch encoder. The default paths are those
of ``python -m pathflip_jax.quickstart --workdir runs/quickstart``, which runs every stage
before this one (README.md, "One stage at a time", has them one by one), so after it
``python -m pathflip_jax.train --config configs/pathflip_demo.py --config.total_steps=5
--workdir W`` trains a short run on its features.

Model: the paper's (DESIGN.md section 2), narrowed: a 2-layer Q-Former (width 128, 8 queries)
reads each slide's patch features (all of them: the slide token; each region of 2 x 2 patches,
256 µm a side: the region tokens); a 2-layer slide-context Transformer over [slide; regions] with
2-D region positions; 8-head text-conditioned region attention; a 128-d joint space. Losses as
the paper's: slide InfoNCE (tau 0.1, label smoothing 0.1) plus the region sigmoid loss (8
subcaptions per slide; one negative subcaption from every other slide of the batch). The paper's
five ablations are fields: ``slide_loss``, ``region_loss``, ``region_attention`` (False: the
mean of the regions), ``region_qformer`` (False: the projected mean of a region's patch
features) and ``slide_qformer`` (False: the mean of the region tokens).

Args (``:key=value,...``): ``features_dir``, ``manifest`` (a manifest joined by slide_id; "":
captions, labels and splits from the features' slides.jsonl), ``captions`` (a
data_prep/decompose_captions.py output; "": sentences of the caption), ``tokenizer`` ("": one
trained on the training split), ``cohort_dir`` (the demo cohort: adds the ``localization``
evaluator), ``reference`` (the patch_clip run that extracted the features: localization and
zero-shot also score that encoder's own text alignment, and the ``slide_mil`` evaluator adds an
attention-MIL classifier trained on the diagnoses as the supervised reference),
``probe_label`` (a slide column: adds the ``slide_linear_probe`` evaluator), ``eval_split``
(``test``; "": no evaluators), ``region_patches`` (regions of R x R patches; evaluation keeps
256 patches' worth of them, 512 at size ``study``) and
``size`` (``demo``; ``study``, the same model for the study cohort of ``quickstart --size
study``; or ``test``, a tiny model and a 4-step run for the test suite).

Expected: docs/results.md, "Zero-shot diagnosis" to "Biomarker".
"""

from configs import common
from pathflip_jax import config_args

DIAGNOSES = ["benign", "carcinoma", "carcinoma with necrosis", "lymph node metastasis"]
PROMPTS = {
    "benign": ["benign tissue, no malignancy is identified", "the features are benign",
               "benign glands in fibrous stroma"],
    "carcinoma": ["invasive carcinoma", "sheets of tumour cells in desmoplastic stroma",
                  "diagnosis: invasive carcinoma"],
    "carcinoma with necrosis": ["carcinoma with tumour necrosis", "necrotic carcinoma",
                                "invasive carcinoma with an area of necrosis"],
    "lymph node metastasis": ["lymph node with metastatic carcinoma",
                              "metastatic carcinoma in a lymph node",
                              "tumour cells within sheets of small lymphocytes"],
}

# Localization queries: the demo cohort's tissue types (the lesions give the headline mean),
# each described in the words of the cohort's captions (names x appearances; the queries the
# localization evaluator averages, chosen on the val split over the bare names).
_TISSUE_WORDS = {
    "tumour": (["invasive carcinoma", "nests of malignant epithelial cells",
                "sheets of tumour cells", "a carcinoma"],
               ["with large pleomorphic hyperchromatic nuclei and prominent nucleoli",
                "showing crowded, enlarged, irregular dark nuclei"]),
    "necrosis": (["tumour necrosis", "an area of necrosis", "comedo-type necrosis",
                  "necrotic debris"],
                 ["with pale eosinophilic debris and scattered nuclear fragments",
                  "containing ghost cells and karyorrhectic nuclear dust"]),
    "benign glands": (["benign glands", "normal glandular structures", "unremarkable glands",
                       "well-formed benign ducts"],
                      ["lined by a single layer of bland cuboidal cells around open lumina",
                       "with round lumina and regularly spaced basal nuclei"]),
    "lymphocytes": (["a lymphoid aggregate", "dense lymphocytes", "a lymphocytic infiltrate",
                     "sheets of small lymphocytes"],
                    ["of small round dark nuclei packed closely together",
                     "made of densely packed small round lymphocytes"]),
    "fat": (["adipose tissue", "mature fat", "fatty tissue", "adipocytes"],
            ["with large empty polygonal vacuoles and thin septa",
             "made of large clear adipocytes separated by delicate membranes"]),
    "stroma": (["fibrous stroma", "collagenous stroma", "desmoplastic stroma", "stromal tissue"],
               ["with wavy pink collagen fibres and scattered spindle nuclei",
                "composed of eosinophilic fibres with sparse elongated nuclei"]),
}
TISSUE_PROMPTS = {tissue: [f"{name} {look}" for name in names for look in looks]
                  for tissue, (names, looks) in _TISSUE_WORDS.items()}
TISSUES = list(TISSUE_PROMPTS)
# The demo's biomarker is likelier with tumour-infiltrating lymphocytes and more tumour: the
# zero-shot AUROC of the slide_linear_probe evaluator contrasts these descriptions.
BIOMARKER_PROMPTS = {
    "1": ["invasive carcinoma with a lymphocytic infiltrate",
          "sheets of tumour cells and dense lymphocytes", "a large carcinoma with lymphocytes"],
    "0": ["benign glands in fibrous stroma", "stroma without tumour or lymphocytes",
          "a small carcinoma without lymphocytes"],
}
LESIONS = ["tumour", "necrosis", "benign glands"]


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, features_dir="runs/quickstart/features", manifest="", captions="", tokenizer="",
      cohort_dir="", reference="", probe_label="", eval_split="test", region_patches=2,
      size="demo")
  config = common.align_stage(
      config_args.ml_collections.ConfigDict(), features_dir=args.features_dir,
      manifest=args.manifest, captions=args.captions, tokenizer=args.tokenizer,
      class_names=DIAGNOSES, vocab_size=1000, tokenizer_type="bpe", dtype="float32")

  if args.region_patches < 1:
    raise ValueError(f"config arg region_patches={args.region_patches}: expected >= 1")
  config.data = dict(region_patches=args.region_patches, num_regions=24,
                     eval_num_regions=max(1, 256 // args.region_patches ** 2),
                     num_subcaptions=8, max_sentences=3, caption_len=192, subcaption_len=64,
                     buckets=(64, 256, 512, 1024, 4096, 16384, 65536), max_patches=65536,
                     patch_dropout=0.1)
  steps = dict(total_steps=600, log_steps=200)
  if args.size == "study":
    # The study cohort's slides (data_prep/make_demo_cohort.py --size study) hold up to ~120
    # regions of 2 x 2 patches: evaluation (and the instruct stage's visual tokens) keeps them
    # all, so the questions' region answers are defined on what the decoder sees. Its 191
    # training slides give 400 steps about 17 epochs; one evaluation, at the end, leaves the
    # time for the ablations' seeds (quickstart --ablation_seeds).
    config.data.eval_num_regions = max(1, 512 // args.region_patches ** 2)
    steps = dict(total_steps=400, log_steps=400)
  if args.size in ("demo", "study"):
    config.model = dict(
        qformer=dict(width=128, depth=2, num_heads=4, mlp_ratio=2.0, num_queries=8,
                     cross_attention_every=2),
        embed_dim=128, context_depth=2, context_heads=4, region_heads=8)
  elif args.size == "test":
    config.data.caption_len, config.data.subcaption_len = 64, 32
    config.data.num_subcaptions = 4
    config.model = dict(
        qformer=dict(width=32, depth=2, num_heads=2, mlp_ratio=2.0, num_queries=4,
                     cross_attention_every=2),
        embed_dim=32, context_depth=1, context_heads=2, region_heads=2, position_frequencies=4)
    steps = dict(total_steps=4, log_steps=4)
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo', 'study' or 'test'")
  common.trainer(config, **steps, batch_size=8, lr=3e-4,
                 warmup_steps=min(50, steps["total_steps"] // 10), end_lr_fraction=0.05,
                 weight_decay=0.05, grad_clip_norm=5.0, workers=1)
  config.evals = {} if not args.eval_split else dict(
      zero_shot=dict(type="slide_zero_shot", split=args.eval_split, prompts=PROMPTS,
                     score="slide", reference=args.reference),
      retrieval=dict(type="slide_retrieval", split=args.eval_split),
  )
  if args.reference and args.eval_split:
    # The supervised reference for zero-shot diagnosis: attention-MIL on the features.
    config.evals.mil = dict(type="slide_mil", split=args.eval_split)
  if args.probe_label and args.eval_split:
    config.evals.probe = dict(
        type="slide_linear_probe", split=args.eval_split, label_key=args.probe_label,
        shots=(1, 2, 4, 8), draws=10,
        prompts=BIOMARKER_PROMPTS if args.probe_label == "biomarker" else {})
  # The demo cohort's label maps make text-prompted localization measurable.
  if args.cohort_dir and args.eval_split:
    config.evals.localization = dict(
        type="localization", split=args.eval_split, cohort_dir=args.cohort_dir, queries=TISSUES,
        lesions=LESIONS, prompts=TISSUE_PROMPTS, positive_fraction=0.5, froc=True,
        reference=args.reference)
  config.lock()
  return config
