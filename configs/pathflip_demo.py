r"""PathFLIP alignment on the demo cohort (stage "align"), small enough for 2 CPU cores.

Pipeline and command (``W`` is the workdir; the first four steps are configs/patch_clip_demo.py's):

  python -m data_prep.make_demo_cohort --output_dir runs/demo/cohort
  python -m data_prep.tile_slides --manifest runs/demo/cohort/manifest.jsonl \
      --output_dir runs/demo/patches
  python -m pathflip_jax.train --config configs/patch_clip_demo.py --workdir runs/demo/patch_clip
  python -m data_prep.extract_features --patches runs/demo/patches \
      --output_dir runs/demo/features \
      --config configs/extract_features.py:checkpoint=runs/demo/patch_clip
  python -m pathflip_jax.train --config configs/pathflip_demo.py --workdir W

Args (``--config configs/pathflip_demo.py:key=value,...``): ``features_dir``
(runs/demo/features), ``captions`` (a data_prep/decompose_captions.py output; "" splits captions
into sentences), ``tokenizer`` ("" trains one on the train split's text), ``text_init`` (a
patch_clip workdir, e.g. runs/demo/patch_clip: the Q-Former's text branch, embeddings and text
projection start from its text tower, and its tokenizer is used; "" = from scratch),
``total_steps``,
``batch_size`` (slides), ``lr``, ``workers``, ``size`` (``demo``, or ``test``: a tiny model for the
test suite), ``seed``, ``log_steps``, ``eval_split`` (``test``), and the ablations
``slide_loss``, ``region_loss`` and ``region_attention`` (False: mean-pooled regions);
``cohort_dir`` (the demo cohort: adds the ``localization`` evaluator, which scores text-prompted
heatmaps against the cohort's label maps) and ``heatmap_method`` (``contribution``, or
``attention``: the region attention weights alone; see ``PathFlip.patch_heatmap``; by default
``attention`` with ``identity_qk``, else ``contribution``),
``reference`` (the patch_clip workdir whose ViT extracted the features: the localization
evaluator also reports, as ``reference/...``, that model's own patch-level text alignment), and
``probe_label`` (a slide column, e.g. ``biomarker``: adds the ``slide_linear_probe`` evaluator,
linear and few-shot probes on the frozen slide embeddings and, for the biomarker, zero-shot
AUROC from prompts), and ``feature_shortcut`` (False; True: slide and region tokens start as the
patch encoder's joint image-text embeddings, ``PathFlipConfig.feature_shortcut`` and
``identity_region_values``; needs ``text_init`` = the patch_clip run that extracted the features),
``identity_values`` (True; False: with ``feature_shortcut``, the text-conditioned attention's
value and output projections start at random, as in the paper, instead of at the identity),
``slide_shortcut`` (True; False: with ``feature_shortcut``, the region tokens only) and
``named_negatives`` (False; True: a subcaption whose tissue words, ``NEGATIVE_LEXICON``, the
slide's own caption names too is no negative for that slide; not in the paper),
``slide_weight`` (1.0: the slide loss's weight), ``region_weight`` (1.0: the region loss's)
and ``region_patches`` (2: regions of 2 x 2 patches; 1: single-patch regions, which the
joint-space recipe of ``quickstart --joint`` uses), ``value_gate`` (False; True: with
``feature_shortcut``, the value path starts at random as in the paper, beside the identity path
behind a per-head gate that starts at 0, ``PathFlipConfig.region_value_gate``; overrides
``identity_values``; what ``quickstart --joint`` runs), ``gate_lr`` (1000: that gate's
learning rate as a multiple of ``lr``, ``optim.lr_multipliers``) and ``zero_output`` (False;
True: with ``feature_shortcut`` and without the identity start, the text-conditioned
attention's output projection starts at 0, ``PathFlipConfig.region_output_zero_init``; what
``quickstart --joint`` runs, beside ``value_gate``), ``within_negatives`` (0; W > 0, with
``named_negatives``: a slide's own subcaptions that name disjoint tissues are negatives, of
weight W, against the embeddings each other drew, ``loss.within_slide_weight``; not in the
paper; ``quickstart --joint`` runs W=1 since the night of 2026-12-02) and ``local_attention``
(False; True: the text-conditioned attention reads each region token as it enters the
slide-context Transformer, not as it leaves it,
``PathFlipConfig.local_region_attention``), ``lock_text`` (False; True, with ``text_init``: the
Q-Former takes the text tower's shape, 1 layer with MLP ratio 4, and its text branch stays frozen
at that tower, ``LOCKED_TEXT``) and ``identity_qk`` (False; True: one region head whose query and
key projections are the identity and, unless ``hold_match=False``, stay so, frozen with the layer
norms before them, ``PathFlipConfig.region_identity_qk`` and ``HELD_MATCH``), ``hold_match``
(True; False, with ``identity_qk``: the query and key projections start as the identity but the
region loss trains them, and the heatmap reads each region's contribution; what ``quickstart
--joint`` runs since 2026-12-03, docs/experiments/localization.md, "The match trained again, read
by contribution") and ``attention_positions`` (True; False, with ``local_attention``: the
attention reads each region's own pooled patches without its position embedding,
``PathFlipConfig.local_region_positions``); the last five are not in the paper, and ``quickstart
--joint`` runs ``local_attention``, ``lock_text`` and ``identity_qk`` since 2026-12-02
(docs/experiments/localization.md, "The joint space kept") and ``hold_match=False`` since
2026-12-03. ``max_sentences`` (3, the paper's rule: a training subcaption is a run or a
random pick of 1 to ``max_sentences`` of the caption's sentences,
``captions.sample_subcaption_indices``; subcaptions are cut at 64 tokens, about two of the demo's
sentences; with ``quickstart --joint`` one-sentence subcaptions lowered localization on all five
cohorts tried, docs/experiments/localization.md, "Also tried on the cohorts where the ablation
wins"). ``select_split`` ("": the run's model is its last step; ``val``: it is the checkpoint
whose heatmaps localize the lesions best on that split's label maps, scored every
``select_every`` (50) steps by the ``val_localization`` evaluator, ``config.checkpoint.use_best``;
needs ``cohort_dir``; ``quickstart --joint`` runs it since 2026-12-04).

Model: the paper's, narrowed. A 2-layer Q-Former (width 128, 8 queries, cross-attention into the
patches in layer 0) reads each slide's patch features (all of them: slide token; each region of
2 x 2 patches, 512 px at 0.5 µm/px = 256 µm a side: region tokens); a 2-layer slide-context
Transformer over [slide; regions] with 2-D region positions; 8-head text-conditioned region
attention; 128-d joint space. Losses as the paper: slide InfoNCE (tau 0.1, label smoothing 0.1)
+ region sigmoid loss (8 subcaptions per slide; one negative subcaption from every other slide of
the batch).

Measured (default 48-slide cohort, seed 0, features from configs/patch_clip_demo.py; 2 CPU cores):
8 min 15 s wall on the first 2-core machine (1.45 steps/s), 1 min 16 s with evaluations on a
later one. Test split, 13 slides: zero-shot diagnosis balanced accuracy 0.88 with seed=0, 0.81
with seed=1 (chance 0.25, majority class 0.31), macro AUC 0.94 / 0.86; slide -> caption R@1
0.23 / 0.15 (chance 0.077), R@5 0.69 / 0.77 (chance 0.38). The errors are carcinoma vs carcinoma
with necrosis (necrosis covers 1-5 patches of a demo slide). lr 3e-4 was chosen on cohorts made with
--seed 1 and 2 and on seed 0's val split, two training seeds each: mean zero-shot 0.76 (0.50-1.00
over the six runs) against 0.63 with 1e-3 (README, "Alignment (PathFLIP)"; measured before the
region attention's text queries were layer-normed).

Localization (``cohort_dir=runs/demo/cohort``; or afterwards ``python -m pathflip_jax.evaluate
--config <same config> --workdir W``), seed 0, test split, patch-level AUROC per slide (chance
0.5): mean over the lesion queries 0.69 (tumour 0.84, necrosis 0.68, benign glands 0.55) with
``heatmap_method=contribution``, 0.67 with seed=1; 0.41 with ``attention`` (the weights alone
lean away from the queried tissue); the ``region_loss=False`` ablation 0.43. Method and prompts
were chosen on the val split. Lesion FROC (mean sensitivity at 1/4-8 false positives per
slide): 0.36, against 0.15 without the region loss. For scale, ``reference=runs/demo/patch_clip``
(the patch encoder's own text alignment, trained with patch-level supervision): 0.79, FROC 0.67.
``quickstart --joint`` runs an opt-in recipe on the features of a 1920-step patch encoder
(``quickstart.JOINT_RECIPE``, lr 5e-5, ``select_split=val``; not the paper's model): 0.851-0.975
mean lesion AUROC on 16 cohorts (test splits; mean 0.926; 0.802-0.974 and at least 0.85 on 13 with
lr 1e-4 and the last step), against a flat ``region_loss=False`` ablation (README,
"Heatmaps, localization and evaluation"). How each of its switches came in, with its numbers:
docs/experiments/localization.md.

Biomarker probe (``probe_label=biomarker``; the demo's label is mostly chance, weakly tied to
tumour-infiltrating lymphocytes), seed 0, 26 training / 13 test slides: linear probe AUC 0.71,
balanced accuracy 0.58 (mean patch features: 0.62 / 0.67; majority class 0.54); zero-shot AUROC
from prompts 0.50 (chance 0.5). Thirteen slides make these numbers coarse.
"""

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
# The tissue words of the demo's captions, for ``named_negatives``: a subcaption that names only
# tissues the slide's own caption names too is no negative for that slide.
NEGATIVE_LEXICON = {
    "tumour": ["carcinoma", "tumour", "malignant", "metastatic", "metastasis"],
    "necrosis": ["necrosis", "necrotic"],
    "glands": ["glands", "glandular", "ducts"],
    "lymphocytes": ["lymphoid", "lymphocytes", "lymphocytic"],
    "fat": ["adipose", "fat", "fatty", "adipocytes"],
    "stroma": ["stroma", "stromal", "fibrous", "collagenous"],
}


# Every parameter of the Q-Former's text branch (config arg lock_text; a 1-layer Q-Former).
LOCKED_TEXT = ("^qformer/token_embed$", "^qformer/pos_embed$", "^qformer/layers/0/self_norm/",
               "^qformer/layers/0/self_attention/", "^qformer/layers/0/text_mlp_norm/",
               "^qformer/layers/0/text_mlp/", "^qformer/norm/", "^text_proj/")

# The text-conditioned attention's match, held at the identity (config arg identity_qk): the
# query and key projections and the layer norms before them.
HELD_MATCH = ("^region_attention/attention/(q|k)_(kernel|bias)$",
              "^region_attention/(text|region)_norm/")


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, features_dir="runs/demo/features", manifest="", captions="", tokenizer="",
      text_init="",
      total_steps=600, batch_size=8, lr=3e-4, workers=1, size="demo", seed=0, log_steps=200,
      eval_split="test",
      slide_loss=True, region_loss=True, region_attention=True, cohort_dir="",
      heatmap_method="", probe_label="", reference="", feature_shortcut=False,
      slide_shortcut=True, named_negatives=False, slide_weight=1.0, region_weight=1.0,
      region_patches=2,
      identity_values=True, value_gate=False, gate_lr=1000.0, zero_output=False,
      within_negatives=0.0, local_attention=False, lock_text=False, identity_qk=False,
      attention_positions=True, max_sentences=3, hold_match=True, select_split="",
      select_every=50)
  config = config_args.ml_collections.ConfigDict()
  config.stage = "align"
  config.seed = args.seed
  config.features_dir = args.features_dir
  # "": captions, labels and split come from the feature directory's slides.jsonl.
  config.manifest = args.manifest
  config.captions = args.captions
  config.label_key = "diagnosis"
  config.class_names = DIAGNOSES
  config.tokenizer = args.tokenizer
  # A patch_clip workdir: the Q-Former's text branch starts from its text tower (and tokenizer).
  config.text_init = args.text_init
  config.vocab_size = 1000
  config.tokenizer_type = "bpe"
  config.dtype = "float32"

  if args.max_sentences < 1:
    raise ValueError(f"config arg max_sentences={args.max_sentences}: expected >= 1")
  if args.region_patches < 1:
    raise ValueError(f"config arg region_patches={args.region_patches}: expected >= 1")
  # Evaluation keeps up to 256 patches' worth of regions per slide, whatever their size.
  config.data = dict(region_patches=args.region_patches, num_regions=24,
                     eval_num_regions=max(1, 256 // args.region_patches ** 2),
                     num_subcaptions=8, max_sentences=args.max_sentences, caption_len=192,
                     subcaption_len=64,
                     buckets=(64, 256, 1024, 4096, 16384, 65536), max_patches=65536,
                     patch_dropout=0.1,
                     negative_lexicon=NEGATIVE_LEXICON if args.named_negatives else {})
  if args.size == "demo":
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
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo' or 'test'")
  # Tokens start in the patch encoder's joint space (PathFlipConfig.feature_shortcut; with
  # text_init = the patch_clip run that extracted the features).
  config.model.feature_shortcut = args.feature_shortcut
  config.model.region_value_gate = args.feature_shortcut and args.value_gate
  config.model.identity_region_values = (args.feature_shortcut and args.identity_values
                                         and not args.value_gate)
  config.model.region_output_zero_init = (args.feature_shortcut and args.zero_output
                                          and not config.model.identity_region_values)
  config.model.slide_shortcut = args.slide_shortcut
  config.model.local_region_attention = bool(args.local_attention)
  config.model.local_region_positions = bool(args.attention_positions)
  if not args.attention_positions and not args.local_attention:
    raise ValueError("config arg attention_positions=False needs local_attention=True: after "
                     "the slide context every region token holds positions")
  if args.lock_text:
    if not args.text_init:
      raise ValueError("config arg lock_text=True needs text_init=<the patch_clip run>: the "
                       "locked text branch is that run's text tower")
    # The Q-Former's text branch shaped as configs/patch_clip_demo.py's text tower (1 layer, MLP
    # ratio 4), so text_init fills every text parameter, which then stay frozen (LiT's locked
    # tower, on the text side). The self-attention and final norm are shared with the query
    # branch and stay frozen for it too.
    config.model.qformer.update(depth=1, mlp_ratio=4.0, cross_attention_every=1)
  # One head whose query and key projections start as the identity: the attention starts as
  # the match of text and region in the joint space (PathFlipConfig.region_identity_qk).
  config.model.region_identity_qk = bool(args.identity_qk)
  if args.identity_qk:
    config.model.region_heads = 1
  # The match stays at the identity (frozen below) unless hold_match=False lets the loss train it.
  if not args.hold_match and not args.identity_qk:
    raise ValueError("config arg hold_match=False needs identity_qk=True: only the identity "
                     "match is held, any other query and key projections train anyway")
  held_match = bool(args.identity_qk and args.hold_match)
  # With the match held at the identity the attention weights are the joint space's own
  # text-region match, so the heatmap reads them. Otherwise the weights alone lean away from the
  # queried tissue, and the heatmap reads each region's contribution, which only the region loss
  # can make (docstring numbers).
  heatmap_method = args.heatmap_method or ("attention" if held_match else "contribution")
  config.slide_loss = args.slide_loss
  config.region_loss = args.region_loss
  config.region_attention = args.region_attention
  if args.within_negatives and not args.named_negatives:
    raise ValueError(f"config arg within_negatives={args.within_negatives} needs "
                     "named_negatives=True: the pairs it adds are told apart by the subcaptions' "
                     "tissue words")
  config.loss = dict(slide_weight=float(args.slide_weight),
                     region_weight=float(args.region_weight), temperature=0.1,
                     label_smoothing=0.1, within_slide_weight=float(args.within_negatives))

  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.optim = dict(optimizer="adamw", lr=args.lr, schedule="cosine",
                      warmup_steps=min(50, args.total_steps // 10), end_lr=args.lr * 0.05,
                      weight_decay=0.05, grad_clip_norm=5.0)
  if config.model.region_value_gate:
    # One scalar per head, moved ~lr per step by Adam: at lr alone it could not pass ~0.03 in
    # a demo run, while the projected values it competes with are ~0.05 a channel
    # (docs/experiments/localization.md, "The identity path behind a shut gate": 10x and 100x
    # fell short on held-out cohorts).
    config.optim.lr_multipliers = {"^region_attention/value_gate$": float(args.gate_lr)}
  frozen = LOCKED_TEXT if args.lock_text else ()
  if held_match and args.region_attention:
    # Trained, the projections can drift from the match: the region loss scores only the
    # attended mean, and on an earlier recipe seed 11's necrosis heatmap fell to 0.56 while its
    # tokens' cosine with the text held 0.97 (docs/experiments/localization.md, "The match held
    # at the identity"). hold_match=False trains them (what quickstart --joint runs).
    frozen += HELD_MATCH
  if frozen:
    config.optim.frozen = frozen
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=4)
  config.log_steps = args.log_steps
  config.progress_seconds = 10.0
  config.checkpoint = dict(every=args.log_steps, keep=2, best_metric="", best_mode="max",
                           use_best=False, async_save=True)
  # eval_split="": no evaluators (a run evaluated later with pathflip_jax.evaluate).
  config.evals = {} if not args.eval_split else dict(
      zero_shot=dict(type="slide_zero_shot", split=args.eval_split, prompts=PROMPTS,
                     score="both"),
      retrieval=dict(type="slide_retrieval", split=args.eval_split),
  )
  if args.probe_label and args.eval_split:
    config.evals.probe = dict(
        type="slide_linear_probe", split=args.eval_split, label_key=args.probe_label,
        shots=(1, 2, 4, 8), draws=10,
        prompts=BIOMARKER_PROMPTS if args.probe_label == "biomarker" else {})
  # The demo cohort's label maps make text-prompted localization measurable.
  localization = dict(type="localization", cohort_dir=args.cohort_dir, method=heatmap_method,
                      queries=TISSUES, lesions=LESIONS, prompts=TISSUE_PROMPTS,
                      positive_fraction=0.5)
  if args.cohort_dir and args.eval_split:
    config.evals.localization = dict(localization, split=args.eval_split, froc=True,
                                     reference=args.reference)
  # The run's model is its checkpoint that localizes best on another split (early stopping on
  # label maps the test split does not see).
  if args.select_split:
    if not args.cohort_dir:
      raise ValueError(f"config arg select_split={args.select_split!r} needs cohort_dir (the "
                       "label maps its localization is scored against)")
    if args.select_split == args.eval_split:
      raise ValueError(f"config arg select_split={args.select_split!r} is the eval_split; choose "
                       "the checkpoint on another split (val)")
    if args.select_every < 1:
      raise ValueError(f"config arg select_every={args.select_every}: expected >= 1")
    name = f"{args.select_split}_localization"
    config.evals[name] = dict(localization, split=args.select_split, froc=False, reference="",
                              every=args.select_every)
    config.checkpoint.best_metric = f"{name}/mean_lesion_auroc"
    config.checkpoint.use_best = True
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)
  config.lock()
  return config
