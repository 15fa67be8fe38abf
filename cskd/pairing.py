"""Is the student worth training? Parameters, FLOPs and measured latency of a student and its teacher.

Deployment-aware distillation starts here: the point of the student is to run much cheaper than
its teacher, so ``cskd train`` reports both before the first epoch and warns when the student is
not at least :data:`MIN_ADVANTAGE` times cheaper. FLOPs come from ``torch.utils.flop_counter``
(matmuls, attention and convolutions, 2 per multiply-add); latency is PyTorch eager on the CPU at batch 1,
the median of a few calls (an estimate: exported engines are faster, the ratio is what matters).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

MIN_ADVANTAGE = 2.0


@dataclass
class Cost:
    params: int
    flops: int  # per image
    latency_ms: float  # PyTorch eager, CPU, batch 1


@dataclass
class PairingReport:
    teacher: str
    student: str
    teacher_cost: Cost
    student_cost: Cost

    @property
    def flops_ratio(self) -> float:
        return self.teacher_cost.flops / max(self.student_cost.flops, 1)

    @property
    def latency_ratio(self) -> float:
        return self.teacher_cost.latency_ms / max(self.student_cost.latency_ms, 1e-9)

    @property
    def worth_it(self) -> bool:
        return min(self.flops_ratio, self.latency_ratio) >= MIN_ADVANTAGE

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "flops_ratio": self.flops_ratio, "latency_ratio": self.latency_ratio, "worth_it": self.worth_it}

    def lines(self) -> list[str]:
        t, s = self.teacher_cost, self.student_cost
        out = [f"  pairing: teacher {self.teacher} {t.params / 1e6:.2f}M params, {t.flops / 1e9:.3f} GFLOPs/img, {t.latency_ms:.2f} ms; "
               f"student {self.student} {s.params / 1e6:.2f}M, {s.flops / 1e9:.3f} GFLOPs, {s.latency_ms:.2f} ms "
               f"-> {self.flops_ratio:.1f}x fewer FLOPs, {self.latency_ratio:.1f}x faster (PyTorch CPU, batch 1)"]
        if not self.worth_it:
            ratio = min(self.flops_ratio, self.latency_ratio)
            how = f"only {ratio:.1f}x cheaper to run than" if ratio >= 1 else f"{1 / ratio:.1f}x MORE expensive to run than"
            out.append(f"  warning: the student is {how} its teacher (want >= {MIN_ADVANTAGE:.0f}x); "
                       "a smaller student or a bigger teacher makes distillation pay off at deployment")
        return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU one that scaled_dot_product_attention
# runs here, and would count a ViT's attention matmuls as zero: count it with torch's own formula.
_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(model: nn.Module, input_shape: tuple) -> int:
    """FLOPs of one forward pass of ``model`` (eval mode, CPU) on one image of ``input_shape`` (C, H, W),
    as ``torch.utils.flop_counter`` counts them (matmuls, attention and convolutions, 2 per multiply-add)."""
    model = model.eval().cpu()
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def measure_cost(model: nn.Module, input_shape: tuple, repeats: int = 7) -> Cost:
    """Parameters, FLOPs per image and median CPU latency of ``model`` (eval mode) at batch 1."""
    model = model.eval().cpu()
    x = torch.zeros(1, *input_shape)
    flops = count_flops(model, input_shape)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return Cost(count_params(model), flops, 1000 * statistics.median(times))


def compare(teacher_name: str, teacher: nn.Module, student_name: str, student: nn.Module, input_shape: tuple) -> PairingReport:
    """Cost of the deployable ``teacher`` and ``student`` modules on images of ``input_shape`` (C, H, W)."""
    return PairingReport(teacher_name, student_name, measure_cost(teacher, input_shape), measure_cost(student, input_shape))
