"""An independent float64 implementation of EDM2's network formulas (edm2 training/networks_edm2.py), written from
the equations, not from sid_fast's modules: it reads a state_dict and the init kwargs and evaluates D(x, sigma) and
u(sigma). Resampling is written as 2x2 average pooling / nearest upsampling (what the [1,1] filter of every
published configuration amounts to); attention as an explicit softmax.

`upstream_train=True` evaluates what upstream's train-mode forward computes: each MPConv first overwrites its weight
with the normalised weight (forced weight normalisation), then normalises that again. The dict passed in is updated
in place, as upstream's parameters are.
"""

import math

import torch
import torch.nn.functional as F

EPS = 1e-4


def _rms_normalize(x, dims):
    n = x.pow(2).mean(dim=dims, keepdim=True).sqrt()
    return x / (EPS + n)


def _weight(sd, key, gain, upstream_train):
    w = sd[key].double()
    if upstream_train:
        w = _rms_normalize(w, list(range(1, w.ndim)))
        sd[key] = w.clone()
    w = _rms_normalize(w, list(range(1, w.ndim)))
    fan_in = w[0].numel()
    return w * gain / math.sqrt(fan_in)


def _conv(sd, key, x, gain=1.0, upstream_train=False):
    w = _weight(sd, key, gain, upstream_train)
    if w.ndim == 2:
        return x @ w.T
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _silu(x):
    return x * torch.sigmoid(x) / 0.596


def _sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def _cat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * c * (1 - t) / math.sqrt(na), b * c * t / math.sqrt(nb)], dim=1)


def _fourier(sd, prefix, x):
    f, p = sd[prefix + ".freqs"].double(), sd[prefix + ".phases"].double()
    return torch.cos(x[:, None] * f[None, :] + p[None, :]) * math.sqrt(2)


def _attention(qkv, heads):
    n, c3, h, w = qkv.shape
    ch = c3 // 3 // heads
    y = qkv.reshape(n, heads, ch, 3, h * w)  # channel (head*ch + c)*3 + j
    y = y / (EPS + y.pow(2).mean(dim=2, keepdim=True).sqrt())
    q, k, v = y[:, :, :, 0], y[:, :, :, 1], y[:, :, :, 2]
    logits = torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(ch)
    e = torch.exp(logits - logits.amax(dim=3, keepdim=True))
    a = e / e.sum(dim=3, keepdim=True)
    out = torch.einsum("nhqk,nhck->nhcq", a, v)
    return out.reshape(n, heads * ch, h, w)


def _block(sd, p, x, emb, *, flavor, mode, heads, cfg, upstream_train):
    has = lambda name: f"{p}.{name}.weight" in sd  # noqa: E731
    if mode == "down":
        x = F.avg_pool2d(x, 2)
    elif mode == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if flavor == "enc":
        if has("conv_skip"):
            x = _conv(sd, f"{p}.conv_skip.weight", x, upstream_train=upstream_train)
        x = _rms_normalize(x, [1])
    y = _conv(sd, f"{p}.conv_res0.weight", _silu(x), upstream_train=upstream_train)
    c = _conv(sd, f"{p}.emb_linear.weight", emb, gain=sd[f"{p}.emb_gain"].double(), upstream_train=upstream_train) + 1
    y = _silu(y * c[:, :, None, None])
    y = _conv(sd, f"{p}.conv_res1.weight", y, upstream_train=upstream_train)
    if flavor == "dec" and has("conv_skip"):
        x = _conv(sd, f"{p}.conv_skip.weight", x, upstream_train=upstream_train)
    x = _sum(x, y, cfg.get("res_balance", 0.3))
    if heads:
        a = _attention(_conv(sd, f"{p}.attn_qkv.weight", x, upstream_train=upstream_train), heads)
        x = _sum(x, _conv(sd, f"{p}.attn_proj.weight", a, upstream_train=upstream_train), cfg.get("attn_balance", 0.3))
    clip = cfg.get("clip_act", 256)
    return x.clamp(-clip, clip)


def edm2_forward(sd, cfg, x, sigma, labels=None, upstream_train=False, return_logits=False):
    """(D(x, sigma), u(sigma) or None[, encoder logits]) in float64 for the EDM2 Precond described by `cfg`."""
    sd_ = sd
    x, sigma = x.double(), sigma.double().reshape(-1, 1, 1, 1)
    sdata = cfg.get("sigma_data", 0.5)
    c_skip = sdata**2 / (sigma**2 + sdata**2)
    c_out = sigma * sdata / (sigma**2 + sdata**2).sqrt()
    c_in = 1 / (sdata**2 + sigma**2).sqrt()
    c_noise = sigma.flatten().log() / 4

    res0, mc = cfg["img_resolution"], cfg["model_channels"]
    mult, nb = cfg["channel_mult"], cfg["num_blocks"]
    attn_res = cfg["attn_resolutions"]
    cph = cfg.get("channels_per_head", 64)
    emb = _conv(sd_, "unet.emb_noise.weight", _fourier(sd_, "unet.emb_fourier", c_noise), upstream_train=upstream_train)
    if cfg["label_dim"]:
        lab = labels.double() if labels is not None else torch.zeros(1, cfg["label_dim"], dtype=torch.float64)
        e_lab = _conv(sd_, "unet.emb_label.weight", lab * math.sqrt(cfg["label_dim"]), upstream_train=upstream_train)
        emb = _sum(emb, e_lab, cfg.get("label_balance", 0.5))
    emb = _silu(emb)

    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for level, m in enumerate(mult):
        r = res0 >> level
        ch = mc * m
        if level == 0:
            h = _conv(sd_, f"unet.enc.{r}x{r}_conv.weight", h, upstream_train=upstream_train)
        else:
            h = _block(
                sd_,
                f"unet.enc.{r}x{r}_down",
                h,
                emb,
                flavor="enc",
                mode="down",
                heads=0,
                cfg=cfg,
                upstream_train=upstream_train,
            )
        skips.append(h)
        for i in range(nb):
            h = _block(
                sd_,
                f"unet.enc.{r}x{r}_block{i}",
                h,
                emb,
                flavor="enc",
                mode="keep",
                heads=ch // cph if r in attn_res else 0,
                cfg=cfg,
                upstream_train=upstream_train,
            )
            skips.append(h)
    logits = h.mean(dim=1, keepdim=True)
    for level in reversed(range(len(mult))):
        r = res0 >> level
        ch = mc * mult[level]
        if level == len(mult) - 1:
            cur = h.shape[1]
            h = _block(
                sd_,
                f"unet.dec.{r}x{r}_in0",
                h,
                emb,
                flavor="dec",
                mode="keep",
                heads=cur // cph,
                cfg=cfg,
                upstream_train=upstream_train,
            )
            h = _block(
                sd_,
                f"unet.dec.{r}x{r}_in1",
                h,
                emb,
                flavor="dec",
                mode="keep",
                heads=0,
                cfg=cfg,
                upstream_train=upstream_train,
            )
        else:
            h = _block(
                sd_,
                f"unet.dec.{r}x{r}_up",
                h,
                emb,
                flavor="dec",
                mode="up",
                heads=0,
                cfg=cfg,
                upstream_train=upstream_train,
            )
        for i in range(nb + 1):
            h = _cat(h, skips.pop(), cfg.get("concat_balance", 0.5))
            h = _block(
                sd_,
                f"unet.dec.{r}x{r}_block{i}",
                h,
                emb,
                flavor="dec",
                mode="keep",
                heads=ch // cph if r in attn_res else 0,
                cfg=cfg,
                upstream_train=upstream_train,
            )
    F_x = _conv(sd_, "unet.out_conv.weight", h, gain=sd_["unet.out_gain"].double(), upstream_train=upstream_train)
    D = c_skip * x + c_out * F_x
    u = None
    if "logvar_linear.weight" in sd_:
        u = _conv(
            sd_, "logvar_linear.weight", _fourier(sd_, "logvar_fourier", c_noise), upstream_train=upstream_train
        ).reshape(-1, 1, 1, 1)
    return (D, u, logits) if return_logits else (D, u)
