"""Input handling shared by EDM's preconditioners (precond.py) and EDM2's (edm2.py): the same rules in both official
codebases (EDM training/networks.py, edm2 training/networks_edm2.py)."""

from __future__ import annotations

import torch


def prepare_inputs(net, x, sigma, class_labels, force_fp32: bool):
    """(x fp32, sigma [N or 1, 1, 1, 1] fp32, class labels, UNet dtype) for a preconditioner `net` with label_dim,
    use_fp16 and sid_fast's compute_dtype: labels None without classes, zeros [1, label_dim] ("no class") when not
    given; the UNet body in fp16 under use_fp16 on CUDA only (fp32 on a CPU, as upstream), or in compute_dtype."""
    x = x.to(torch.float32)
    sigma = (
        sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if torch.is_tensor(sigma)
        else torch.full([1, 1, 1, 1], float(sigma), device=x.device)
    )
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    if force_fp32:
        dtype = torch.float32
    elif net.compute_dtype is not None:
        dtype = net.compute_dtype
    else:
        dtype = torch.float16 if (net.use_fp16 and x.is_cuda) else torch.float32
    return x, sigma, class_labels, dtype
