"""Knowledge-distillation toolbox: logit KD and the response (DKD, DIST), feature-map (hint,
attention, FSP, NST, factor transfer, activation boundaries) and relation (RKD, similarity, PKT,
CC, IRG, CRD) losses, feature hooks, a loss registry, soft targets, mutual learning and DAFL
data-free distillation.

Importing the package registers every loss in :data:`distill.registry.LOSSES`.
"""

from distill.contrastive import CRDLoss, nce_loss
from distill.data_free import (
    BatchNormPrior,
    Generator,
    GeneratorStep,
    activation_loss,
    dafl_generator_loss,
    default_feature_path,
    frozen,
    information_entropy_loss,
    onehot_loss,
    train_generator_step,
)
from distill.data_free_train import DataFreeSettings, DataFreeTrainer, distill_data_free
from distill.feature_losses import (
    AttentionTransferLoss,
    HintLoss,
    RKDLoss,
    SimilarityPreservingLoss,
    attention_loss,
    attention_map,
    hint_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)
from distill.features import FeatureExtractor
from distill.losses import KDLoss, kd_loss, kd_loss_terms, soft_target_loss, teacher_log_probs
from distill.map_losses import (
    ActivationBoundaryLoss,
    FactorTransferLoss,
    FSPLoss,
    NSTLoss,
    activation_boundary_loss,
    factor_transfer_loss,
    fsp_loss,
    fsp_matrix,
    nst_loss,
    train_paraphraser,
)
from distill.registry import LOSSES, CombinedLoss, create_loss, list_losses
from distill.relation_losses import (
    CCLoss,
    IRGLoss,
    PKTLoss,
    cc_loss,
    correlation_matrix,
    irg_loss,
    pkt_loss,
)
from distill.response_losses import DISTLoss, DKDLoss, dist_loss, dkd_loss, dkd_parts
from distill.schemes import MutualGroup, mutual_learning_loss
from distill.targets import complete_topk, log_soft_targets, soft_targets

__all__ = [
    "LOSSES",
    "ActivationBoundaryLoss",
    "AttentionTransferLoss",
    "BatchNormPrior",
    "CCLoss",
    "CRDLoss",
    "CombinedLoss",
    "DISTLoss",
    "DKDLoss",
    "DataFreeSettings",
    "DataFreeTrainer",
    "FSPLoss",
    "FactorTransferLoss",
    "FeatureExtractor",
    "Generator",
    "GeneratorStep",
    "HintLoss",
    "IRGLoss",
    "KDLoss",
    "MutualGroup",
    "NSTLoss",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "activation_boundary_loss",
    "activation_loss",
    "attention_loss",
    "attention_map",
    "cc_loss",
    "complete_topk",
    "correlation_matrix",
    "create_loss",
    "dafl_generator_loss",
    "default_feature_path",
    "dist_loss",
    "distill_data_free",
    "dkd_loss",
    "dkd_parts",
    "factor_transfer_loss",
    "frozen",
    "fsp_loss",
    "fsp_matrix",
    "hint_loss",
    "information_entropy_loss",
    "irg_loss",
    "kd_loss",
    "kd_loss_terms",
    "list_losses",
    "log_soft_targets",
    "mutual_learning_loss",
    "nce_loss",
    "nst_loss",
    "onehot_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "soft_target_loss",
    "soft_targets",
    "teacher_log_probs",
    "train_generator_step",
    "train_paraphraser",
]
