"""SiDA: adversarial Score identity Distillation with real data (Zhou et al., ICLR 2025; official SiD repository,
branch `sida`: sida_training/sida_training_loop.py and sida_training/sida_loss.py).

The fake score f_psi is also the discriminator: its logits are the channel mean of its encoder's last feature map
(sid_fast.networks, return_flag). One iteration, as the official loop:
  1. fake-score/discriminator step: a batch of real images (and its labels) from --data; x_g = G(sigma_init z, labels)
     without gradient (G in eval mode); sigma ~ LogNormal(-1.2, 1.2); fake y (and its augment labels) and real y_r
     augmented with independent draws when --augment > 0; one noise n shared by both branches;
     (D_fake, logits_fake) = f_psi(y + sigma n, 'encoder_decoder'), logits_real = f_psi(y_r + sigma n, 'encoder');
     loss = sum(lambda (D_fake - y)^2) * ls / B + sum(L_D) * lsd / B; gradients cleaned with nan_to_num, then clipped
     elementwise at 1 (clip_grad_value_), Adam step.
  2. generator step, only after 100k images: SiD's term on x_t = x_g + sigma eps (sigma from tmax) and, after 200k
     images, 0.5 SiD + 0.5 GAN, the GAN term BCE(clamp(f_psi's logits on the same x_t, +-10), 1) / w scaled by
     C*H*W * lsg_gan / B. During the first 100k images the official loop runs G's forward and backward and discards
     the gradients; here that phase is skipped (the same parameters; the global dropout RNG stream then differs).
  3. EMA of G as SiD.
Real images are read in a fixed global order: sample k of the run (k = it * batch + m * batch_gpu + j for micro-batch
m) is entry k mod N of a permutation drawn from (seed, k div N), so resuming needs only the images seen, whatever
the number of processes (the official sampler restarts its order on resume).
"""

from __future__ import annotations

import numpy as np
import torch

from sid_fast import ops
from sid_fast.latents import encode_latents
from sid_fast.losses import (
    edm2_loss_from_output,
    edm_loss_from_output,
    finite_rows,
    sid_weight,
    sida_discriminator_loss,
    sida_generator_gan_loss,
    sida_schedule,
)
from sid_fast.training.config import ConfigError
from sid_fast.training.sid import SiDTrainer

REAL_LATENTS = 2  # the generator stream of the draws that turn stored latents (mean, std) into samples
REAL_PAIRS = 3  # the same for latent/caption pairs (2 is also the hash of a few-step generator's k)


class RealImages(torch.utils.data.Dataset):
    """Sample k of the run's real-image stream: (uint8 image [C, H, W], integer label or -1, k). With xflip the
    dataset counts twice, the second half mirrored (EDM's --xflip)."""

    def __init__(self, dataset, seed: int, xflip: bool):
        self.dataset, self.seed, self.xflip = dataset, seed, xflip
        self.n = len(dataset) * (2 if xflip else 1)
        self._perm_epoch, self._perm = None, None

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.RandomState([self.seed % (1 << 31), epoch % (1 << 31)]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __len__(self):  # a stream without end; the sampler says which k to read
        return 1 << 62

    def __getitem__(self, k: int):
        i = self.index(k)
        img, _ = self.dataset[i % len(self.dataset)]
        img = np.asarray(img)  # uint8 images, or float32 raw latents of a latent dataset
        if i >= len(self.dataset):
            img = img[:, :, ::-1]
        labels = self.dataset.labels_int
        label = int(labels[i % len(self.dataset)]) if labels is not None else -1
        return torch.from_numpy(np.array(img)), label, k  # np.array: a writable copy


class _MicroBatches(torch.utils.data.Sampler):
    """The sample numbers of this rank's micro-batches from iteration `it0` on, in the order the trainer reads them."""

    def __init__(self, it0: int, batch: int, batch_gpu: int, rounds: int, rank: int):
        self.it0, self.batch, self.batch_gpu, self.rounds, self.rank = it0, batch, batch_gpu, rounds, rank

    def __iter__(self):
        it = self.it0
        while True:
            for rnd in range(self.rounds):
                start = it * self.batch + (self.rank * self.rounds + rnd) * self.batch_gpu
                yield list(range(start, start + self.batch_gpu))
            it += 1


class SiDATrainer(SiDTrainer):
    """SiDTrainer with the discriminator in the fake-score phase and the GAN term in the generator phase, through the
    SiD phases' hooks."""

    def __init__(self, cfg, device, family, **kwargs):
        if family.sida is None:
            raise ConfigError(f"--method sida: SiDA is not built for the {family.name} family's teachers.")
        if family.real_data is None:
            raise ValueError("SiDATrainer: real images are needed (--data).")
        super().__init__(cfg, device, family, **kwargs)
        real_dataset = family.real_data
        self.real = RealImages(real_dataset, self.cfg.seed, self.cfg.xflip)
        # A latent dataset (EDM2): each real sample is drawn afresh from its stored mean and std (official
        # vae_edm2_encode_latents), with a generator seeded per micro-batch like every other draw.
        self.real_latents = getattr(real_dataset, "meta", {}).get("format") == "sid_fast.latents"
        self._loader = None
        self._gan_weights = (1.0, 0.0)
        # Elementwise clipping at 1 of the fake score's gradients in the EDM loop; none in the EDM2 loop (official).
        self.fake_grad_clip = family.sida.fake_grad_clip

    # Real data: opened lazily at the current iteration, so that resuming (which sets cur_nimg) starts in place.
    def _real_batch(self, rnd: int):
        it = self.cur_nimg // self.cfg.batch
        if self._loader is None or self._loader_pos != (it, rnd):
            sampler = _MicroBatches(it, self.cfg.batch, self.cfg.batch_gpu, self.rounds, self.rank)
            workers = self.cfg.workers if self.device.type == "cuda" else 0
            # Its own generator: a DataLoader draws a base seed when iterated, which must not move the global RNG
            # (dropout), or a resumed run would differ from an uninterrupted one.
            loader = torch.utils.data.DataLoader(
                self.real,
                batch_sampler=sampler,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.cfg.seed),
            )
            self._loader = iter(loader)
        img, labels, ks = next(self._loader)
        first = it * self.cfg.batch + (self.rank * self.rounds + rnd) * self.cfg.batch_gpu
        assert int(ks[0]) == first, (int(ks[0]), first)  # the stream and the trainer agree on the samples
        self._loader_pos = (it, rnd + 1) if rnd + 1 < self.rounds else (it + 1, 0)
        return self._real_inputs(img, labels, rnd)

    def _real_inputs(self, img, labels, rnd: int):
        """(images or latents on the device, one-hot labels or None) of the loader's batch."""
        if self.real_latents:
            x = encode_latents(img.to(self.device, non_blocking=True), self.micro_batch_rng(REAL_LATENTS, rnd))
        else:
            x = img.to(self.device, non_blocking=True).float() / 127.5 - 1
        onehot = None
        if self.family.label_dim:
            onehot = torch.eye(self.family.label_dim, device=self.device)[labels.to(self.device, non_blocking=True)]
        return x, onehot

    # Fake-score phase: the fake score is also the discriminator.
    def fake_phase_inputs(self, rnd: int, g):
        """A batch of real images and its labels; z drawn from `g` (the generated images take the real labels)."""
        real, labels = self._real_batch(rnd)
        z = torch.randn(self.denoiser.image_shape(self.cfg.batch_gpu), device=self.device, generator=g)
        return z, labels, real

    def fake_phase_loss(self, y, aug, noise, level, cond, real):
        """sum(lambda (D_fake - y)^2) * ls / B + sum(L_D) * lsd / B (official sida_loss.py); the noise and sigma are
        shared by the generated and the real branch."""
        cfg, den = self.cfg, self.denoiser
        y_r, aug_r = real
        sigma = level  # SiDA's families (EDM, EDM2) have continuous noise levels sigma
        out = den.fake(self.calls.fake_train, y + noise, sigma, cond, aug, return_flag="encoder_decoder")
        logits_real = den.discriminator_logits(self.calls.fake_train, y_r + noise, sigma, cond, aug_r)
        # The official filter of this phase (EDM2: u too, official sida_loss_edm2.py).
        ok = finite_rows(y, out.D, out.logits, logits_real, *(() if out.u is None else (out.u,)))
        if out.u is None:
            loss_el, _ = edm_loss_from_output(out.D, y, sigma)
        else:  # EDM2: lambda / e^u (D - y)^2 + u; the discriminator term divided by e^u (no +u)
            loss_el, _ = edm2_loss_from_output(out.D, y, sigma, out.u)
        loss_fake = torch.where(ok.reshape(-1, 1, 1, 1), loss_el, 0).sum()
        loss_D_rows = sida_discriminator_loss(logits_real, out.logits, sigma, ok)
        if out.u is not None:
            loss_D_rows = per_exp_u(loss_D_rows, out.u, ok)
        loss_D = loss_D_rows.sum()
        stats = dict(
            loss_fake=loss_fake.detach(), loss_D=loss_D.detach(), rows_fake=ok.sum(), nan_samples_fake=(~ok).sum()
        )
        return (loss_fake * cfg.ls + loss_D * cfg.lsd) / self.batch_gpu_total, stats

    # Generator phase: SiD's term, then SiD's and the GAN term.
    def generator_phase(self):
        cfg = self.cfg
        step, w_sid, w_gan = sida_schedule(
            self.cur_nimg, round(cfg.sida_g_start_kimg * 1000), round(cfg.sida_gan_start_kimg * 1000)
        )
        if not step:  # the official loop computes and discards this phase during the first 100k images
            return torch.zeros((), dtype=torch.bool, device=self.device)
        self._gan_weights = (w_sid, w_gan)
        return super().generator_phase()

    def generator_loss(self, x_g, x_t, level, cond, y_real):
        cfg, den = self.cfg, self.denoiser
        w_sid, w_gan = self._gan_weights
        flag = "encoder_decoder" if w_gan > 0 else None
        out = den.fake(self.calls.fake_eval, x_t, level, cond, return_flag=flag)
        loss_sid, loss_gan, ok = sida_generator_terms(
            x_g, y_real, out, cfg.alpha, edm2_rule=self.family.sida.edm2_rules
        )
        total = w_sid * cfg.lsg * loss_sid
        if loss_gan is not None:
            total = total + w_gan * cfg.lsg_gan * loss_gan
        else:
            loss_gan = torch.zeros((), device=self.device)
        stats = dict(loss_G=loss_sid.detach(), loss_G_gan=loss_gan.detach(), rows_G=ok.sum(), nan_samples_G=(~ok).sum())
        return total / self.batch_gpu_total, stats


def sida_generator_terms(x_g, y_real, out, alpha: float, edm2_rule: bool):
    """(summed SiD term, summed GAN term C*H*W sum_i BCE_mean / w_i or None without logits, [N] rows kept) of one
    generator micro-batch, with each official version's NaN rule:
    - EDM (sida_training/sida_loss.py): rows with a NaN in x_g, y_real or y_fake are dropped from the SiD term and from
      the GAN term's sum over 1 / w_i, but the BCE mean runs over the logits of every row: one NaN logit makes the
      term NaN (and the official nan_to_num then zeroes the gradients it poisons);
    - EDM2 (sida_training_edm2/sida_loss_edm2.py): rows with a NaN logit (or u) are dropped from both terms, and the
      BCE mean runs over the kept rows.
    EDM2's terms are divided by e^u of the fake score."""
    keep = finite_rows(out.logits) if edm2_rule and out.logits is not None else None
    loss_sid, ok = ops.sid_generator_loss_sum(x_g, y_real, out.D, alpha, u=out.u, keep=keep)
    if out.logits is None:
        return loss_sid, None, ok
    mask = ok.reshape(-1, 1, 1, 1)
    w = sid_weight(torch.where(mask, x_g, 0), torch.where(mask, y_real, 0))
    mean_over = ok if edm2_rule else torch.ones_like(ok)
    gan_rows = sida_generator_gan_loss(out.logits, w, ok, mean_over=mean_over)
    if out.u is not None:
        gan_rows = per_exp_u(gan_rows, out.u, ok)
    return loss_sid, x_g[0].numel() * gan_rows.sum(), ok


def per_exp_u(rows: torch.Tensor, u: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per-sample terms [N, 1, 1, 1] divided by e^u of their sample, zero where not `ok` (EDM2's SiDA terms)."""
    m = ok.reshape(-1, 1, 1, 1)
    u = u.reshape(-1, 1, 1, 1)
    u = u if u.dtype == torch.float64 else u.float()
    return torch.where(m, rows / torch.where(m, u, 0).exp(), 0)


class FlowSiDATrainer(SiDATrainer):
    """The data-aided variant on flow-matching teachers (ml-sid-dit `--train_diffusiongan 1`,
    training/sid_dit_sd3_training_loop.py; the family: sid_fast.families.flow). The fake network is the discriminator:
    its final tokens after norm_out, averaged over tokens, one logit per channel (sid_fast.t2i.flow.PooledTokens).
    Real data are latent/caption pairs (--data, sid_fast.t2i.pairs), read in SiDA's fixed global order; every phase
    draws its prompts from the pairs' captions.
      1. fake-network step: x_g from G (k of its K steps) on drawn captions; one t and one eps shared by the generated
         and the real branch; the flow-matching loss of kappa1's velocity on x_g with the logits of the same call's
         conditional half, and the logits of the real latent x_t (one conditional call, its own caption):
         loss = sum ||v - (eps - x_g)||^2 * ls / B + sum C*H*W (BCE_mean(real, 1) + BCE_mean(fake, 0)) / 2 * lsd / B,
         logits clamped to +-10, BCE averaged over channels, no t-weight.
      2. generator step after --sida-g-start-kimg (official 20k images): SiD's loss; after --sida-gan-start-kimg
         (40k) 0.5 SiD + 0.5 GAN with GAN = sum C*H*W w(t) BCE_mean(logits of x_t, 1) * lsg_gan / B, the logits from
         the fake network's kappa2 call that gives y_fake.
    Where it differs from the official loop: rows with a NaN in any of v, x_g or either branch's logits leave both
    terms of the fake phase (the official drops NaN rows of the generated branch only, and then adds tensors of
    different lengths); the real branch conditions on its caption's own pooled embedding (the official precomputed
    mode pairs SD3's real text embedding with the generated branch's pooled one); captions are drawn uniformly with
    replacement (the official iterates a shuffled shard); during the first --sida-g-start-kimg the generator phase is
    skipped (the official runs it and discards its gradients)."""

    def fake_phase_inputs(self, rnd: int, g):
        """(z, the conditioning of drawn captions, (real latents, their captions' conditioning)): the generated
        branch's captions are drawn from `g` as SiD's, apart from the real pairs (official: two streams)."""
        real = self._real_batch(rnd)
        z, cond = self.draw_z_cond(g, fake_phase=True)
        return z, cond, real

    def prepare_real(self, real, g):
        return real  # (latents, conditioning): no augmentation of latents

    def _real_inputs(self, raw, idx, rnd: int):
        """(real latents drawn afresh from their posterior, the conditioning of their captions): the family's."""
        return self.family.real_inputs(raw.to(self.device, non_blocking=True), idx.numpy(),
                                       self.micro_batch_rng(REAL_PAIRS, rnd))  # fmt: skip

    def fake_phase_loss(self, y, aug, noise, level, cond, real):
        cfg, den = self.cfg, self.denoiser
        x_real, cond_real = real
        out = den.fake(self.calls.fake_train, den.noisy(y, noise, level), level, cond, training=True,
                       return_flag="encoder_decoder")  # fmt: skip
        logits_real = den.discriminator_logits(self.calls.fake_train, den.noisy(x_real, noise, level), level, cond_real)
        loss_fake, loss_D, ok = den.data_aided_fake_loss_sums(out, logits_real, y, noise)
        stats = dict(
            loss_fake=loss_fake.detach(), loss_D=loss_D.detach(), rows_fake=ok.sum(), nan_samples_fake=(~ok).sum()
        )
        return (loss_fake * cfg.ls + loss_D * cfg.lsd) / self.batch_gpu_total, stats

    def generator_loss(self, x_g, x_t, level, cond, y_real):
        cfg, den = self.cfg, self.denoiser
        w_sid, w_gan = self._gan_weights
        out = den.fake(self.calls.fake_eval, x_t, level, cond, return_flag="encoder_decoder" if w_gan > 0 else None)
        loss_sid, loss_gan, ok = den.data_aided_generator_loss_sums(x_g, y_real, out, cfg.alpha, level)
        total = w_sid * cfg.lsg * loss_sid + w_gan * cfg.lsg_gan * loss_gan
        stats = dict(loss_G=loss_sid.detach(), loss_G_gan=loss_gan.detach(), rows_G=ok.sum(), nan_samples_G=(~ok).sum())
        return total / self.batch_gpu_total, stats
