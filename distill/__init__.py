"""Knowledge-distillation toolbox: logit KD, feature/relational losses, feature hooks,
a loss registry and DAFL data-free distillation."""

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
from distill.losses import KDLoss, kd_loss, soft_target_loss, teacher_log_probs, topk_to_probs
from distill.registry import CombinedLoss, create_loss, list_losses, register_loss

__all__ = [
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
    "create_loss",
    "dafl_generator_loss",
    "default_feature_path",
    "distill_data_free",
    "frozen",
    "hint_loss",
    "information_entropy_loss",
    "kd_loss",
    "list_losses",
    "onehot_loss",
    "register_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "soft_target_loss",
    "teacher_log_probs",
    "topk_to_probs",
    "train_generator_step",
]
