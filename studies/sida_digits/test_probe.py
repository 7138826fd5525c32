"""The SiDA probe measures what SiDA's generator steps on."""

import torch

from sid_fast.training.config import resolve_config
from sid_fast.training.run import build_trainer
from studies.sida_digits.probe import auc, probe_gradients


def test_probe_gradients_are_the_two_terms_of_the_generator_phase():
    """The probe's GAN:SiD gradient ratio: its two gradients add up to the gradient the generator phase hands to the
    optimizer, on the same draws (the bundled digits teacher and data, one micro-batch of 4)."""
    over = dict(batch=4, batch_gpu=4, metrics="none", lsg_gan=10.0)
    tr = build_trainer(resolve_config("digits-sida", over), torch.device("cpu"), log=lambda *_: None)
    tr.fake_score_phase()  # the fake score moves off the teacher, so that the SiD term's gradient is not ~0
    tr.cur_nimg = 200_004  # past both warm-ups: 0.5 SiD + 0.5 GAN
    seen = {}
    step = tr.opt_g.step

    def spy():
        seen["grads"] = [p.grad.clone() for p in tr.G.parameters()]
        step()

    tr.opt_g.step = spy
    draws = tr.generator_draws(0)
    probe = probe_gradients(tr, 4, 0, draws=draws)
    tr.generator_phase()

    def whole(g, p):
        return (g if g is not None else torch.zeros_like(p)).flatten()

    grads = zip(probe["grads"]["sid"], probe["grads"]["gan"], tr.G.parameters())
    both = torch.cat([whole(gs, p) + whole(gg, p) for gs, gg, p in grads])
    trained = torch.cat([g.flatten() for g in seen["grads"]])
    # Two backward passes summed against one of the sum: fp32 rounding only. A term missing or weighed wrongly (0.5,
    # C*H*W, lsg_gan, the batch mean) moves the sum by the smaller term's share, asserted here to be at least 1%.
    assert float((both - trained).norm()) <= 1e-4 * float(trained.norm())
    assert min(probe["grad_gan"], probe["grad_sid"]) > 1e-2 * float(trained.norm())


def test_probe_auc_counts_pairs_and_ties():
    # pairs (real > fake): 1>0, 2>0, 2=2 (half), 3>0, 3>2 of six
    assert auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0])) == 4.5 / 6
    assert auc(torch.tensor([5.0]), torch.tensor([1.0, 2.0])) == 1.0 and auc(torch.zeros(3), torch.zeros(2)) == 0.5
