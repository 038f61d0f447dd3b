"""Distribution-matching pieces shared by the no-head-access attacks SDAR and FORA.

Both attacks train a *substitute* of the client's head (the public architecture, fresh weights)
on the cloud's public auxiliary images so that its features look like the ones the cloud
recorded, then train an inverse network on the substitute's (feature, image) pairs and apply it
to the recorded features. They differ only in what "look like" means:

* SDAR (Zhu et al., NDSS 2025): the frozen tail must classify the substitute's features
  (cross-entropy on the auxiliary labels) and a feature discriminator, trained with the binary
  GAN loss, must not tell them from the recorded ones;
* FORA (Xu et al., CVPR 2024): a domain discriminator trained as a WGAN-GP critic and
  the multi-kernel MMD of Long et al. (ICML 2015, "DAN") between the two feature sets.

So one substitute trainer (:func:`train_substitute`) takes the weight of each term, one critic
(:class:`FeatureCritic`) and one adversarial step (:func:`critic_loss`, :func:`fool_loss`) serve
both GAN flavours, and one inversion trainer (:func:`train_inversion`) fits the decoder. Every
phase trains with :func:`attacks.training.fit_until_converged` on a held-out validation slice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackError, Knowledge
from attacks.decoder import decode, reconstruction_loss
from attacks.gan import Critic, gradient_penalty
from attacks.training import Budget, Curve, fit_until_converged, split_validation
from sim.decoders import build_decoder
from sim.models import build_head

CRITICS = ("bce", "wgan-gp")  # SDAR's binary GAN loss; FORA's Wasserstein loss with penalty
MMD_ALPHAS = tuple(2.0 ** k for k in range(-3, 2))  # FORA/DAN: sigma^2 = alpha * mean distance^2


class FeatureCritic(nn.Module):
    """A discriminator on feature maps: tells recorded features from the substitute's.

    A 3x3 conv, then stride-2 3x3 convs (LeakyReLU 0.2) while the map is larger than 2x2, and a
    linear logit, as the papers' discriminators (SDAR's ``SimulatorDiscriminator``, FORA's
    critic) in miniature. No batch normalisation: WGAN-GP penalises per-sample gradients, which
    batch statistics would couple (Gulrajani et al., 2017), and the binary loss works without.
    """

    def __init__(self, feature_shape: tuple[int, int, int], width: int = 64) -> None:
        super().__init__()
        ch, h, w = feature_shape
        layers: list[nn.Module] = [nn.Conv2d(ch, width, 3, padding=1), nn.LeakyReLU(0.2, True)]
        ch = width
        while h > 2 or w > 2:
            layers += [nn.Conv2d(ch, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            ch, h, w = 2 * width, (h + 1) // 2, (w + 1) // 2
        layers += [nn.Flatten(), nn.Linear(ch * h * w, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).flatten()


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str,
                gp: float = 10.0) -> torch.Tensor:
    """The critic's loss for telling ``real`` (recorded) from ``fake`` (substitute) inputs.

    ``"bce"``: binary cross-entropy on logits, real = 1 (SDAR). ``"wgan-gp"``: the critic
    scores real low and fake high, ``mean D(real) - mean D(fake) + gp * penalty`` (FORA's sign
    convention, with the gradient penalty of Gulrajani et al.).
    """
    d_real, d_fake = critic(real), critic(fake)
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    return d_real.mean() - d_fake.mean() + gp * gradient_penalty(critic, real, fake)


def fool_loss(critic: nn.Module, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator side: make the critic take ``fake`` for real (non-saturating for BCE)."""
    d_fake = critic(fake)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    return d_fake.mean()


def critic_step(critic: nn.Module, optimizer: torch.optim.Optimizer, real: torch.Tensor,
                fake: torch.Tensor, kind: str, gp: float = 10.0) -> float:
    """One optimiser step of the critic on detached inputs; returns its loss."""
    loss = critic_loss(critic, real.detach(), fake.detach(), kind, gp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def mk_mmd(a: torch.Tensor, b: torch.Tensor,
           alphas: Sequence[float] = MMD_ALPHAS) -> torch.Tensor:
    """Squared multi-kernel MMD between two batches (flattened), Gaussian kernels summed.

    Each kernel's bandwidth is ``sigma^2 = alpha * mean pairwise squared distance`` of the pooled
    batch (detached), as in DAN and FORA (alphas 2^-3..2^1). The biased estimate (diagonals
    kept; Gretton et al., JMLR 2012) is never negative, so it can also serve as a validation
    loss whose relative improvements mean something.
    """
    x = torch.cat([a.flatten(1), b.flatten(1)])
    d2 = torch.cdist(x, x).pow(2)
    scale = d2.detach().mean().clamp_min(1e-12)
    k = cast(torch.Tensor, sum(torch.exp(-d2 / (2 * alpha * scale)) for alpha in alphas))  # alphas: not empty
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def features_of(substitute: nn.Module, defense: nn.Module,
                normalise: Callable[[torch.Tensor], torch.Tensor],
                x01: torch.Tensor) -> torch.Tensor:
    """What the substitute would send for these [0, 1] images: defense(head(normalise(x)))."""
    return defense(substitute(normalise(x01)))


def train_substitute(substitute: nn.Module, critic: nn.Module, defense: nn.Module,
                     normalise: Callable[[torch.Tensor], torch.Tensor],
                     aux01: torch.Tensor, labels: torch.Tensor | None,
                     observed: torch.Tensor, aux_split: tuple[torch.Tensor, torch.Tensor],
                     observed_split: tuple[torch.Tensor, torch.Tensor], *,
                     tail: nn.Module | None, ce_weight: float, adv_weight: float,
                     mmd_weight: float, critic_kind: str, gp: float, lr: float,
                     critic_lr: float, batch_size: int, budget: Budget,
                     device: str | torch.device = "cpu", name: str = "substitute") -> Curve:
    """Train the substitute head (and its critic) until its features match the recorded ones.

    Per batch of auxiliary images ``x`` (labels ``y``) and an equal random batch ``z`` of
    recorded features: the substitute steps on ``ce_weight * CE(tail(f(x)), y) + adv_weight *
    fool(D, f(x)) + mmd_weight * MMD(f(x), z)`` (``f`` includes the public defense), then the
    critic ``D`` steps on telling ``z`` from ``f(x)``. Validation, on auxiliary images and
    recorded features neither saw: ``ce_weight * CE + MMD`` (the MMD as a critic-free
    measure of the distribution gap, whatever the training weights; lower is better).
    """
    (aux_train, aux_val), (obs_train, obs_val) = aux_split, observed_split
    use_ce = ce_weight > 0
    if use_ce and (tail is None or labels is None):
        raise ValueError("a cross-entropy term needs the tail and the auxiliary labels")
    substitute.to(device).train()
    critic.to(device).train()
    defense.to(device).train()
    if tail is not None:
        tail.to(device).eval()
    opt_s = torch.optim.Adam(substitute.parameters(), lr=lr)
    opt_c = torch.optim.Adam(critic.parameters(), lr=critic_lr, betas=(0.5, 0.999))
    f = lambda x: features_of(substitute, defense, normalise, x.to(device))  # noqa: E731

    def epoch() -> float:
        order = aux_train[torch.randperm(len(aux_train))]
        total, seen = 0.0, 0
        for start in range(0, len(order) - 1, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # MMD and the critic's batch statistics need two samples
                continue
            x = aux01[idx]
            z = observed[obs_train[torch.randint(len(obs_train), (len(idx),))]].to(device)
            zs = f(x)
            loss = zs.new_zeros(())
            if use_ce:
                assert tail is not None and labels is not None  # checked above
                loss = loss + ce_weight * F.cross_entropy(tail(zs), labels[idx].to(device))
            if adv_weight > 0:
                loss = loss + adv_weight * fool_loss(critic, zs, critic_kind)
            if mmd_weight > 0:
                loss = loss + mmd_weight * mk_mmd(zs, z)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            if adv_weight > 0:
                critic_step(critic, opt_c, z, zs, critic_kind, gp)
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        return total / max(seen, 1)

    m = min(len(aux_val), len(obs_val), 1024)  # one fixed slice: comparable across epochs

    def validate() -> float:
        defense.eval()
        zs = torch.cat([f(aux01[aux_val[i:i + 512]]) for i in range(0, len(aux_val), 512)])
        defense.train()
        val = float(mk_mmd(zs[:m], observed[obs_val[:m]].to(device)))
        if use_ce:
            assert tail is not None and labels is not None  # checked above
            val += ce_weight * float(F.cross_entropy(tail(zs), labels[aux_val].to(device)))
        return val

    return fit_until_converged([substitute, critic], [opt_s, opt_c], epoch, validate, budget,
                               name=name)


def substitute_features(substitute: nn.Module,
                        normalise: Callable[[torch.Tensor], torch.Tensor], aux01: torch.Tensor,
                        device: str | torch.device = "cpu", batch: int = 1024) -> torch.Tensor:
    """The trained substitute's features (before the defense) of all auxiliary images, once:
    the substitute is frozen during inversion, so only the defense's noise needs redrawing."""
    substitute.to(device).eval()
    with torch.no_grad():
        return torch.cat([substitute(normalise(aux01[i:i + batch].to(device)))
                          for i in range(0, len(aux01), batch)])


def train_inversion(decoder: nn.Module, defense: nn.Module, h: torch.Tensor,
                    aux01: torch.Tensor, aux_split: tuple[torch.Tensor, torch.Tensor], *,
                    budget: Budget, batch_size: int, lr: float, weight_decay: float = 1e-4,
                    image_critic: nn.Module | None = None, image_adv: float = 0.0,
                    observed: torch.Tensor | None = None, ssim_weight: float = 0.05,
                    device: str | torch.device = "cpu", name: str = "inversion") -> Curve:
    """Fit ``decoder`` to map ``defense(h)`` (the substitute's features) back to the images.

    ``h`` are the substitute's pre-defense features of ``aux01``; the public defense is applied
    per batch, so a stochastic one draws fresh noise each time (a noise-aware attacker). The
    loss is the decoder attack's (:func:`attacks.decoder.reconstruction_loss`: MSE plus
    ``ssim_weight`` (1 - SSIM); the papers use the MSE alone, ``ssim_weight=0``); with
    ``image_critic`` and ``image_adv > 0``
    (SDAR's decoder discriminator), a binary critic also learns to tell auxiliary images from
    decodings of ``observed`` features and the decoder is pushed to fool it, so that decodings
    of the victims' features look like real images. Validation: that loss on held-out images.
    """
    aux_train, aux_val = aux_split
    decoder.to(device).train()
    defense.to(device).eval()
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    modules, optimizers = [decoder], [opt]
    use_gan = image_critic is not None and image_adv > 0 and observed is not None
    if use_gan:
        assert image_critic is not None  # use_gan
        image_critic.to(device).train()
        opt_c = torch.optim.Adam(image_critic.parameters(), lr=lr, betas=(0.5, 0.999))
        modules, optimizers = [decoder, image_critic], [opt, opt_c]

    def epoch() -> float:
        order = aux_train[torch.randperm(len(aux_train))]
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch normalisation needs two samples
                continue
            x = aux01[idx].to(device)
            with torch.no_grad():
                z = defense(h[idx])
            recon = reconstruction_loss(decoder(z), x, ssim_weight)
            loss = recon
            if use_gan:
                assert image_critic is not None and observed is not None  # use_gan
                z_obs = observed[torch.randint(len(observed), (len(idx),))].to(device)
                fake = decoder(z_obs)
                loss = loss + image_adv * fool_loss(image_critic, fake, "bce")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_gan:
                assert image_critic is not None  # use_gan
                critic_step(image_critic, opt_c, x, fake, "bce")
            total, seen = total + float(recon.detach()) * len(idx), seen + len(idx)
        return total / max(seen, 1)

    def validate() -> float:
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(aux_val), 512):
                idx = aux_val[i:i + 512]
                total += float(reconstruction_loss(decoder(defense(h[idx])), aux01[idx].to(device),
                                                   ssim_weight)) * len(idx)
        return total / len(aux_val)

    return fit_until_converged(modules, optimizers, epoch, validate, budget, name=name)


class SubstituteAttack(Attack):
    """Base of SDAR and FORA: substitute head -> inverse network -> the recorded features.

    Subclasses set the substitute's loss weights and critic (:meth:`__init__` arguments of this
    class) from their paper's parameters. ``fit`` holds out a validation slice of the auxiliary
    images and of the recorded features (:func:`attacks.training.split_validation`), trains the
    substitute to convergence (:func:`train_substitute`), then the decoder
    (:func:`train_inversion`), and keeps both phases' curves in ``self.curves``.
    """

    def __init__(self, *, ce_weight: float, adv_weight: float, mmd_weight: float,
                 critic_kind: str, gp: float, lr: float, critic_lr: float, batch_size: int,
                 critic_width: int, decoder_lr: float, width: int, blocks: int,
                 image_adv: float, max_epochs: int, patience: int, max_seconds: float,
                 device: str) -> None:
        super().__init__()
        if critic_kind not in CRITICS:
            raise ValueError(f"critic must be one of {', '.join(CRITICS)}, got '{critic_kind}'")
        if min(ce_weight, adv_weight, mmd_weight, gp, image_adv) < 0:
            raise ValueError("loss weights and the gradient penalty must be >= 0")
        if ce_weight + adv_weight + mmd_weight <= 0:
            raise ValueError("at least one substitute loss weight must be positive")
        if lr <= 0 or critic_lr <= 0 or decoder_lr <= 0:
            raise ValueError(f"learning rates must be positive, got {lr}, {critic_lr}, "
                             f"{decoder_lr}")
        if batch_size < 2 or critic_width < 1 or width < 1 or blocks < 0:
            raise ValueError(f"need batch_size >= 2, critic_width >= 1, width >= 1, blocks >= 0; "
                             f"got {batch_size}, {critic_width}, {width}, {blocks}")
        self.weights = dict(ce_weight=ce_weight, adv_weight=adv_weight, mmd_weight=mmd_weight)
        self.critic_kind, self.gp, self.lr, self.critic_lr = critic_kind, gp, lr, critic_lr
        self.batch_size, self.critic_width, self.decoder_lr = batch_size, critic_width, decoder_lr
        self.width, self.blocks, self.image_adv, self.device = width, blocks, image_adv, device
        # Budget validates the caps (ValueError, which the registry turns into an AttackError).
        self.budget = Budget(max_epochs=max_epochs, patience=patience, max_seconds=max_seconds)
        self.substitute: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self.curves: list[Curve] = []

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        observed = knowledge.observed
        if observed is None or len(observed) < 4:
            raise AttackError(f"attack '{self.name}' needs the features the cloud recorded "
                              f"(knowledge.observed, at least 4) to align its substitute to")
        observed = torch.as_tensor(observed, dtype=torch.float32)
        if tuple(observed.shape[1:]) != tuple(knowledge.feature_shape):
            raise AttackError(f"attack '{self.name}': recorded features of shape "
                              f"{tuple(observed.shape[1:])}, expected {knowledge.feature_shape}")
        if knowledge.split is None:
            raise AttackError(f"attack '{self.name}' needs the split spec (the public "
                              f"architecture) to build its substitute head")
        if self.weights["ce_weight"] > 0 and (knowledge.tail is None or aux_labels is None):
            raise AttackError(f"attack '{self.name}' trains its substitute through the tail: it "
                              f"needs the cloud's tail and the auxiliary labels (aux_labels)")
        aux_split = split_validation(len(aux01))
        obs_split = split_validation(len(observed), seed=1)
        # A fresh head of the public architecture: never the victim's weights.
        self.substitute = build_head(knowledge.split)
        assert knowledge.defense is not None  # Knowledge builds it from the public spec
        defense = copy.deepcopy(knowledge.defense)
        critic = FeatureCritic(knowledge.feature_shape, self.critic_width)
        self.curves = [train_substitute(
            self.substitute, critic, defense, knowledge.normalise, aux01, aux_labels, observed,
            aux_split, obs_split, tail=knowledge.tail, **self.weights,
            critic_kind=self.critic_kind, gp=self.gp, lr=self.lr, critic_lr=self.critic_lr,
            batch_size=self.batch_size, budget=self.budget, device=self.device,
            name=f"{self.name} substitute")]
        h = substitute_features(self.substitute, knowledge.normalise, aux01, self.device)
        self.decoder = build_decoder(knowledge.feature_shape, knowledge.image_shape,
                                     self.width, self.blocks)
        image_critic = Critic(knowledge.image_shape, self.critic_width) if self.image_adv else None
        self.curves.append(train_inversion(
            self.decoder, defense, h, aux01, aux_split, budget=self.budget,
            batch_size=self.batch_size, lr=self.decoder_lr, image_critic=image_critic,
            image_adv=self.image_adv, observed=observed, device=self.device,
            name=f"{self.name} inversion"))

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        assert self.decoder is not None  # set by _fit (run() checks that fit ran)
        return decode(self.decoder, features, device=self.device)
