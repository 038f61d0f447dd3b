"""FORA: feature-oriented reconstruction without access to the client's head.

Xu et al., "A Stealthy Wrongdoer: Feature-Oriented Reconstruction Attack against Split
Learning" (CVPR 2024). The cloud builds a substitute client ``f~`` (the public architecture,
fresh weights) whose features on public auxiliary images match the *distribution* of the
features it recorded from the victims (the victim's "representation preference"): a domain
discriminator trained as a WGAN-GP critic tells recorded from substitute features and ``f~``
learns to fool it, while the multi-kernel MMD (Long et al., ICML 2015) between the two feature
sets is minimised: the substitute's loss is ``(1 - a) * L_adv + a * L_mkmmd``. An inverse
network trained on ``(f~(x_aux), x_aux)`` is then applied to the recorded features. FORA needs
neither the tail nor labels, which is why it also works on a U-shaped split.

Paper / reference defaults (CIFAR-10): ``a = 0.8``, substitute Adam 1e-4, discriminator Adam
3e-4, gradient penalty 1000, Gaussian kernels with ``sigma^2 = 2^k * mean distance^2`` for
k = -3..1, batch 64, inverse network Adam 1e-3. Differences here: the substitute trains to
convergence on held-out data and then the inverse network does (the paper trains both for a
fixed 10k-40k iterations alongside the victim's training); the substitute's learning rate is
1e-3, so that it converges within this CPU budget (1e-4 was not compared here); and the
discriminator and inverse network are narrow (CEM's decoder in place of FORA's).
"""

from __future__ import annotations

from attacks.alignment import SubstituteAttack
from attacks.base import register
from sim.models import SPLITS


@register
class Fora(SubstituteAttack):
    """FORA (CVPR 2024): substitute client matched to the recorded features by a WGAN-GP
    domain discriminator and MK-MMD, then an inverse network. Works on both splits (vanilla and
    U-shaped): it uses only the recorded features and public images, never the tail or labels.

    Parameters:
        a: weight of the MK-MMD term, ``1 - a`` that of the discriminator (paper: 0.8).
        gp: gradient-penalty weight of the critic (reference: 1000).
        lr: substitute Adam learning rate (paper: 1e-4; see the module notes).
        critic_lr: discriminator Adam learning rate (paper: 3e-4).
        decoder_lr: inverse network's Adam learning rate (paper: 1e-3).
        batch_size: batch of auxiliary images and of recorded features per step (paper: 64).
        critic_width: channels of the discriminator's first conv.
        width, blocks: the inverse network's channels and residual blocks.
        max_epochs, patience, max_seconds: each phase's budget (see attacks.training.Budget).
        device: where it trains.
    """

    name = "fora"
    needs = "none"
    splits = SPLITS

    def __init__(self, a: float = 0.8, gp: float = 1000.0, lr: float = 1e-3,
                 critic_lr: float = 3e-4, decoder_lr: float = 1e-3, batch_size: int = 64,
                 critic_width: int = 32, width: int = 32, blocks: int = 2,
                 max_epochs: int = 60, patience: int = 4, max_seconds: float = 300.0,
                 device: str = "cpu") -> None:
        if not 0 <= a <= 1:
            raise ValueError(f"a weighs MK-MMD against the discriminator: need 0 <= a <= 1, "
                             f"got {a}")
        super().__init__(ce_weight=0.0, adv_weight=1.0 - a, mmd_weight=a, critic_kind="wgan-gp",
                         gp=gp, lr=lr, critic_lr=critic_lr, batch_size=batch_size,
                         critic_width=critic_width, decoder_lr=decoder_lr, width=width,
                         blocks=blocks, image_adv=0.0, max_epochs=max_epochs,
                         patience=patience, max_seconds=max_seconds, device=device)
