"""What a training run is told: the hyperparameters of every stage, and where the weights go.

The defaults are the shipped recipe; ``modelling.train.cli`` exposes the ones worth changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Where training writes each variant (``<out>/<variant>/``) and evaluation reads them: the shipped weights.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "weights"


@dataclass
class TrainSettings:
    epochs: int = 30
    cnn_epochs: int = 16  # variants that train the 3D CNN (image; fusion end to end): the CPU budget
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without validation improvement before stopping
    val_fraction: float = 0.2
    image_dropout: float = 0.15  # fusion only: share of patients per batch with the image withheld
    vitals_dropout: float = 0.15  # fusion only: share with the vitals withheld (never both)
    threads: int = 2
    staged: bool = True  # fusion from the trained baselines (both branches frozen); False: end to end
    vitals_extra: int = 10000  # vitals-only records (no volume rendered) added to the vitals baseline's training
    aux_seg_weight: float = 2.0  # weight of the lesion-map loss (image variants, when lesion labels exist)
    #: per lesion kind (lacune, WMD, infarct, vessel sign): the rarer and smaller the kind, the heavier its voxels
    aux_seg_pos_weight: tuple[float, ...] = (10.0, 3.0, 3.0, 20.0)
    #: weight of the positives of yes/no concepts; heavier weights sharpened the maps, not the concepts read
    #: from them (MODEL_CARD.md, "Tried, not shipped")
    aux_concept_pos_weight: float = 1.0
    aux_concept_weight: float = 1.0  # weight of the concept losses (when the risk factors are known)
    #: spot detector (lacunes, vessel sign), trained first on full-resolution patches; 0 steps: not trained
    spot_steps: int = 1350
    spot_batch: int = 16
    spot_patch: tuple[int, int, int] = (16, 32, 32)  # (D, H, W) voxels: 80 x 112 x 112 mm
    spot_lr: float = 3e-3
    #: share of patches centred near a lacune / a vessel sign (the rest anywhere): both are rare per voxel
    spot_focus: tuple[float, float] = (0.25, 0.3)
    #: share of patches centred where some patient has a lacune / a vessel sign, cut from a patient without one:
    #: the same anatomy (deep nuclei, a normal middle cerebral artery) shown as background (hard negatives).
    #: Off in the shipped model: they sharpened the concepts but not the fusion model (MODEL_CARD.md)
    spot_negatives: tuple[float, float] = (0.0, 0.0)
    spot_pos_weight: tuple[float, float] = (3.0, 10.0)  # per spot kind, BCE weight of positive voxels
    #: the image concept head refitted alone on the trained CNN (``refit_concept_head``): most epochs, patience
    concept_refit_epochs: int = 400
    concept_refit_patience: int = 30
    concept_refit_lr: float = 1e-3
    #: patients rendered after the training cohort and the vitals-only records, never trained on, that join
    #: the validation split for calibration (0: calibrate on the validation split alone)
    calibration_extra: int = 2000
    #: patients rendered after the calibration cohort, never seen by the CNN, from which the heads on its frozen
    #: features also learn (staged training only): the image concept head (``refit_concept_head``), the image
    #: baseline's risk head and the fusion head: on the CNN's own training patients its features are cleaner than
    #: on anyone else, and those patients alone are too few for the heads (MODEL_CARD.md, "Head cohort"). 0: the
    #: training split alone.
    head_extra: int = 2000
