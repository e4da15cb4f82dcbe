"""Training: the fusion model and its single-modality baselines on the synthetic cohort.

One command reproduces the shipped weights (the cohort, the split, the initialisation, the
batch order and the modality dropout all follow from ``--seed``):

    python -m modelling.train --seed 0 --n 2000 --variant all --threads 2 --out modelling/weights

Per variant, ``<out>/<variant>/`` receives ``weights.pt`` and ``config.json`` (the FusionConfig,
including the calibration and a training summary). A GPU is used when present.

Modules, one job each: ``settings`` (``TrainSettings``, where the weights go), ``data`` (cohorts, cached on
disk; the split; withheld modalities), ``features`` (what a frozen branch computes, batched), ``losses``
(lesion maps, concepts), ``spots`` (the spot detector), ``heads`` (heads fitted on frozen branches),
``loop`` (one variant's training), ``calibration``, ``pipeline`` (a whole run), ``cli`` (the command),
``memory`` (glibc allocator settings for the commands).

Order: the image branch's spot detector (lacunes, vessel sign) on full-resolution patches, frozen; the
image-only and vitals-only baselines; then the fusion model in stages: its image and
vitals branches are the baselines', frozen (so each volume is encoded once, not once per epoch: what keeps
training inside the two-core CPU budget), and the demographics branch and the fusion head are trained on
the fusion objective. ``--end-to-end`` trains the fusion model from scratch instead (several times slower
on a CPU). The vitals baseline also learns from ``--vitals-extra`` vitals-only records (the same cohort's
next patients, no volume rendered: cheap), which the image branch cannot use. The heads trained on the
frozen CNN (the image concept head, the image baseline's risk head, the fusion head) also learn from
``--head-extra`` patients rendered after the calibration cohort, which the CNN never sees: on its own
training patients the CNN's features are cleaner than on anyone else, and 1,600 patients are too few for
the heads. Last, every model's calibration (temperature and intercept) is fitted on the validation split
plus ``--calibration-extra`` patients rendered after the vitals-only records (``calibration.calibrate_saved``).

Each branch ends in named concepts, the risk factors it can see (``modelling.config.IMAGE_CONCEPTS``,
``VITAL_CONCEPTS``), and is taught them directly where the cohort knows them: the image branch learns a
lesion map per kind of finding from ``finding_label`` (as lesion-annotated datasets provide) and the
finding counts and grades from ``image_factors`` (as radiology reads provide); the vitals branch learns the
vital traits from ``vital_factors``. One outcome bit per patient is a weak teacher for a 3D CNN on a
few thousand patients; these targets are what make it learn the findings and not age.

Modality dropout: in each fusion batch a random share of patients have their image withheld
(zeros, ``image_present`` = 0) or their vitals withheld (values 0, mask 0, delta 1: what
``inference.preprocess.vitals_tensors`` returns for no samples). The head therefore learns to
score a patient honestly from whatever modality is there.
"""

from modelling.train.cli import main
from modelling.train.pipeline import run
from modelling.train.settings import TrainSettings

__all__ = ["TrainSettings", "main", "run"]
