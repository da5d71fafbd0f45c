"""dpo2d's 2D-DPO loss on TRL: dpo2d's 2-D data, tokenization, data order and
losses in a subclass of TRL's `DPOTrainer`, for training on many GPUs with
accelerate, DeepSpeed or FSDP.

The data, tokenization, sampler and loss modules need only torch and the
tokenizer; :mod:`dpo2d_trl.trainer` (and the `train` command) need TRL.
"""

__version__ = "0.1.0"

from .align import Aligner, TokenizedPair, fingerprint
from .data import Pair, load_pairs
from .loss import two_d_dpo_losses, two_d_loss
from .sampler import Dpo2dSampler, epoch_order, split_held_out

__all__ = [
    "Aligner",
    "TokenizedPair",
    "fingerprint",
    "Pair",
    "load_pairs",
    "two_d_dpo_losses",
    "two_d_loss",
    "Dpo2dSampler",
    "epoch_order",
    "split_held_out",
    "DPO2DConfig",
    "DPO2DTrainer",
]


def __getattr__(name):
    if name in ("DPO2DConfig", "DPO2DTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
