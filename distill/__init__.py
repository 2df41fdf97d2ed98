"""Knowledge-distillation toolbox: logit KD, feature/relational losses, feature hooks,
a loss registry, soft targets and DAFL data-free distillation.

Importing the package registers every loss in :data:`distill.registry.LOSSES`.
"""

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
from distill.registry import LOSSES, CombinedLoss, create_loss, list_losses
from distill.targets import complete_topk, log_soft_targets, soft_targets

__all__ = [
    "LOSSES",
    "AttentionTransferLoss",
    "BatchNormPrior",
    "CombinedLoss",
    "DataFreeSettings",
    "DataFreeTrainer",
    "FeatureExtractor",
    "Generator",
    "GeneratorStep",
    "HintLoss",
    "KDLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "activation_loss",
    "attention_loss",
    "attention_map",
    "complete_topk",
    "create_loss",
    "dafl_generator_loss",
    "default_feature_path",
    "distill_data_free",
    "frozen",
    "hint_loss",
    "information_entropy_loss",
    "kd_loss",
    "kd_loss_terms",
    "list_losses",
    "log_soft_targets",
    "onehot_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "soft_target_loss",
    "soft_targets",
    "teacher_log_probs",
    "train_generator_step",
]
