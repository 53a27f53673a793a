"""PyTorch networks with the peers' published layouts and state_dict key names.

Written from the peers' code (liyunsheng13/BDL ``model/deeplab.py``, ``model/fcn8s.py``,
``model/discriminator.py``; docs/facts.md section 2) to check the Keras networks and the
converter against an independent implementation, and to time the PyTorch step in
``sait_tf.tools.benchmark --torch``. Needs PyTorch (``pip install sait_tf[convert]``).
Networks: DeepLabV2-ResNet101 (Caffe-style bottlenecks, ceil-mode max-pool, dilated
layer3/layer4, ``layer5.conv2d_list`` summed), FCN8s-VGG16 (pad 100, scaled skips, crops
5/9/31) and the output-space discriminator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from sait_tf.images import CAFFE_BGR_MEAN


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class Classifier(nn.Module):
    def __init__(self, inplanes: int, num_classes: int):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True)
            for d in (6, 12, 18, 24))

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2(nn.Module):
    def __init__(self, num_classes: int, blocks: Sequence[int] = (3, 4, 23, 3),
                 width_multiplier: float = 1.0):
        super().__init__()
        width = [max(1, round(c * width_multiplier)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, width[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = width[0]
        for index, (count, planes, stride, dilation) in enumerate(
                zip(blocks, width, (1, 2, 1, 1), (1, 1, 2, 4), strict=True), start=1):
            layer = []
            for block in range(count):
                layer.append(Bottleneck(inplanes, planes, stride if block == 0 else 1, dilation,
                                        project=block == 0))
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.layer5 = Classifier(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.layer5(x)


VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class FCN8s(nn.Module):
    def __init__(self, num_classes: int, width_multiplier: float = 1.0):
        super().__init__()
        inplanes = 3
        self.stages = []
        for stage, (channels, convs) in enumerate(VGG16_STAGES, start=1):
            channels = max(1, round(channels * width_multiplier))
            names = []
            for index in range(1, convs + 1):
                padding = 100 if (stage, index) == (1, 1) else 1
                setattr(self, f"conv{stage}_{index}",
                        nn.Conv2d(inplanes, channels, 3, padding=padding))
                names.append(f"conv{stage}_{index}")
                inplanes = channels
            self.stages.append(names)
        fc = max(1, round(4096 * width_multiplier))
        self.fc6 = nn.Conv2d(inplanes, fc, 7)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout2d()
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool3 = nn.Conv2d(max(1, round(256 * width_multiplier)), num_classes, 1)
        self.score_pool4 = nn.Conv2d(max(1, round(512 * width_multiplier)), num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2,
                                                bias=False)

    def forward(self, x):
        h = x
        pools = []
        for names in self.stages:
            for name in names:
                h = torch.relu(getattr(self, name)(h))
            h = nn.functional.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        h = self.drop(torch.relu(self.fc6(h)))
        h = self.drop(torch.relu(self.fc7(h)))
        upscore2 = self.upscore2(self.score_fr(h))
        score_pool4 = self.score_pool4(pool4 * 0.01)
        score_pool4 = score_pool4[:, :, 5:5 + upscore2.shape[2], 5:5 + upscore2.shape[3]]
        upscore_pool4 = self.upscore_pool4(upscore2 + score_pool4)
        score_pool3 = self.score_pool3(pool3 * 0.0001)
        score_pool3 = score_pool3[:, :, 9:9 + upscore_pool4.shape[2],
                                  9:9 + upscore_pool4.shape[3]]
        out = self.upscore8(upscore_pool4 + score_pool3)
        return out[:, :, 31:31 + x.shape[2], 31:31 + x.shape[3]]


class OutputDiscriminator(nn.Module):
    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, width * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(width * 4, width * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(width * 8, 1, 4, stride=2, padding=1)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = nn.functional.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


def randomize_(model: nn.Module, seed: int, input_scale: float = 1.0) -> nn.Module:
    """Small random weights keeping activations near unit scale, and non-trivial BN
    statistics (random running mean/var, gamma, beta). ``input_scale`` is the input's size."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    first = True
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = module.weight[0].numel()
                std = (2.0 / fan_in) ** 0.5 / (input_scale if first else 1.0)
                first = False
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, -0.1, 0.1))
            elif isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(uniform(channels, 0.5, 1.5))
                module.bias.copy_(uniform(channels, -0.2, 0.2))
                module.running_mean.copy_(uniform(channels, -0.5, 0.5))
                module.running_var.copy_(uniform(channels, 0.5, 2.0))
    return model.eval()


def caffe_input(rgb_nhwc: np.ndarray) -> torch.Tensor:
    """What the peers feed their networks: BGR minus the mean, NCHW."""
    bgr = rgb_nhwc[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2), dtype=np.float32))


def run(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Forward in eval mode; returns NHWC numpy."""
    with torch.no_grad():
        return model.eval()(inputs).numpy().transpose(0, 2, 3, 1)


# The peers' training step, for tests/test_step_parity.py: parameter groups, learning-rate
# schedules, loss and up-sampling as liyunsheng13/BDL writes them (``BDL.py``, ``model/``).

def freeze_batchnorm_(model: nn.Module, bn_mode: str = "frozen") -> nn.Module:
    """BN as sait_tf trains it in ``bn_mode``: affine parameters never trained (BDL
    ``model/deeplab.py`` sets ``requires_grad = False``); "frozen": the loaded statistics (eval
    mode); "train": BDL's train mode (``BDL.py`` calls ``model.train()``), each batch's
    statistics, running statistics updated."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train(bn_mode == "train")
            module.requires_grad_(False)
    return model


def deeplab_optim_parameters(model: DeepLabV2, learning_rate: float) -> list[dict]:
    """BDL ``ResNet101.optim_parameters``: the trainable parameters of ``conv1``, ``bn1``,
    ``layer1``-``layer4`` at ``learning_rate``, ``layer5`` at 10x.

    Each parameter is listed once. BDL's ``get_1x_lr_params_NOscale`` yields a parameter once
    per enclosing module (3 times for a bottleneck conv, 4 for a shortcut conv, once for
    ``conv1``), and PyTorch 0.4's SGD then steps it that many times per iteration.
    """
    backbone = (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4)
    base = [p for module in backbone for p in module.parameters() if p.requires_grad]
    return [{"params": base, "lr": learning_rate},
            {"params": list(model.layer5.parameters()), "lr": 10 * learning_rate}]


def fcn8s_optim_parameters(model: FCN8s, learning_rate: float) -> list[dict]:
    """BDL ``model/__init__.py`` (``CreateModel``, VGG): conv weights at ``learning_rate``,
    conv biases at 2x; the transposed convs (fixed bilinear kernels) are not optimised."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [{"params": [m.weight for m in convs], "lr": learning_rate},
            {"params": [m.bias for m in convs], "lr": 2 * learning_rate}]


def poly_learning_rate(base: float, step: int, num_steps: int, power: float = 0.9) -> float:
    """BDL ``adjust_learning_rate`` of DeepLab and of D_seg (``model/deeplab.py``,
    ``model/discriminator.py``): ``base * (1 - step / num_steps) ** power``."""
    return base * (1 - step / num_steps) ** power


def step_learning_rate(base: float, step: int, every: int = 50000) -> float:
    """BDL ``adjust_learning_rate`` of VGG and of its D_seg (``model/fcn8s.py``,
    ``model/discriminator.py``): ``base * 0.1 ** (step // every)``."""
    return base * 0.1 ** (step // every)


def set_learning_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Writes one rate per parameter group, as BDL's ``adjust_learning_rate`` does."""
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, corners aligned: BDL ``model/deeplab.py`` (before the loss and D_seg),
    ``SSL.py`` and ``evaluation.py``."""
    return nn.functional.interpolate(logits, size=tuple(size), mode="bilinear",
                                     align_corners=True)


def cross_entropy_2d(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BDL ``CrossEntropy2d``: mean cross-entropy over the pixels not labelled 255."""
    return nn.functional.cross_entropy(logits, labels.long(), ignore_index=255)


class Adam04(torch.optim.Optimizer):
    """``torch.optim.Adam`` as in PyTorch 0.4, the version BDL requires (README): epsilon is
    added to sqrt(v) before the bias correction (later PyTorch adds it after)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = (group["lr"] * (1 - beta2 ** state["step"]) ** 0.5
                             / (1 - beta1 ** state["step"]))
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
