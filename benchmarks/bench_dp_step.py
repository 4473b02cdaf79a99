"""Benchmark one DP-SGD step of every method and per-sample strategy against plain SGD.

Model: the ResNet34 U-Net of :func:`common.model.build_unet`, batch 8, images of 128 and
256 pixels, CPU with 2 threads (and the GPU when one is available). Each timed step is
the whole update: per-sample gradients, masking, clipping, noise, scaling and the SGD
step. All configurations run interleaved in one process, round after round, so load
from other processes hits them alike. The table gives medians over rounds of wall time
and of this process's CPU time, and their ratios to the non-private step's medians. "sys
s" is the CPU time spent in the kernel: on the CPU mostly page faults, because glibc
returns large freed blocks to the system and each step maps its activations again. It
varies from step to step, so "user ratio" compares the rest of the CPU time, the work
the step itself does.

Peak memory is measured once per configuration in a fresh child process, above the
state after building the model and the step object (with its RS mask). "extra MiB": on
the CPU the rise of the resident set (``VmHWM``, reset before the first step) over two
steps; on a GPU ``torch.cuda.max_memory_allocated`` minus the memory allocated before
the first step. "tensor MiB": the peak of live tensor memory during a third step, from
the profiler's allocation events (on a GPU the same as "extra MiB").

Usage: ``python benchmarks/bench_dp_step.py [--quick] [--sizes 128 256] [--rounds N]
[--encoder resnet34] [--rs-rate 0.9]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.metrics import dice_bce_loss  # noqa: E402
from common.model import build_unet  # noqa: E402
from common.privacy.noise import NoiseSource  # noqa: E402
from common.privacy.clipping import AdaptiveClipBound  # noqa: E402
from common.privacy.sparsify import draw_mask  # noqa: E402
from common.privacy.step import DPStep, NonPrivateStep  # noqa: E402

BATCH = 8
THREADS = 2


@dataclass(frozen=True)
class Setup:
    """The model and RS rate every case of a run shares."""

    encoder: str = "resnet34"
    rs_rate: float = 0.9


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: a method and a per-sample strategy."""

    method: str
    strategy: str

    @property
    def label(self) -> str:
        return "none" if self.method == "none" else f"{self.method}/{self.strategy}"


FULL_CASES = [
    Case("none", ""),
    Case("flat", "ghost"), Case("flat", "loop"), Case("flat", "opacus"),
    Case("automatic", "ghost"), Case("adaptive", "ghost"),
    Case("rs", "ghost"), Case("rs", "loop"), Case("rs", "opacus"),
    Case("rs-automatic", "ghost"),
]
QUICK_CASES = [
    Case("none", ""), Case("flat", "ghost"), Case("flat", "loop"),
    Case("rs", "ghost"), Case("rs", "loop"),
]


def build_step(case: Case, model: torch.nn.Module, device: torch.device, rs_rate: float = Setup.rs_rate):
    """Return the step object of ``case`` for ``model`` (RS mask drawn at ``rs_rate``)."""
    if case.method == "none":
        return NonPrivateStep(model, dice_bce_loss)
    adaptive = None
    if case.method == "adaptive":
        adaptive = AdaptiveClipBound(max_grad_norm=1.0, target_quantile=0.5, clip_lr=0.2, count_noise=10.0)
    step = DPStep(
        model, dice_bce_loss, method=case.method, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=BATCH, source=NoiseSource(seed=0, device=device),
        strategy=case.strategy, adaptive=adaptive,
    )
    if case.method.startswith("rs"):
        generator = torch.Generator().manual_seed(0)
        step.set_mask(draw_mask([p.shape for p in step.params], rate=rs_rate, generator=generator, device=device))
    return step


def make_batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    images = torch.rand(BATCH, 1, size, size, generator=generator)
    targets = (torch.rand(BATCH, 1, size, size, generator=generator) > 0.9).float()
    return images.to(device), targets.to(device)


def timed_update(step, optimizer, images, targets, device: torch.device) -> tuple[float, float, float]:
    """Run one update and return its wall time, this process's CPU time and its system part, in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu, system = time.perf_counter(), time.process_time(), _system_seconds()
    step(images, targets)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, _system_seconds() - system


def _system_seconds() -> float:
    # Kernel time of this process: on the CPU mostly page faults of freshly mapped memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def time_cases(
    cases: list[Case], size: int, rounds: int, device: torch.device, setup: Setup
) -> dict[str, list[tuple[float, float, float]]]:
    """Time every case ``rounds`` times, interleaved in a new random order each round, after one warm-up step each."""
    torch.manual_seed(0)
    base = build_unet(encoder=setup.encoder).to(device)
    images, targets = make_batch(size, device)
    # Each case trains its own copy: Opacus's hooks stay on a model once attached and
    # would otherwise slow every other case's forward and backward pass.
    updates = {}
    for case in cases:
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        updates[case.label] = (build_step(case, model, device, setup.rs_rate), torch.optim.SGD(params, lr=1e-6))
    times: dict[str, list[tuple[float, float, float]]] = {case.label: [] for case in cases}
    for step, optimizer in updates.values():
        timed_update(step, optimizer, images, targets, device)
    order = list(updates.items())
    shuffler = random.Random(0)
    for _ in range(rounds):
        # A new random order each round, so that no case always runs right after the same
        # case. In a fixed order the case after `none` measured up to 1.40x at 128 px
        # against 1.2x to 1.3x for the same work, and rotating the order keeps neighbours.
        shuffler.shuffle(order)
        for label, (step, optimizer) in order:
            times[label].append(timed_update(step, optimizer, images, targets, device))
    for step, _ in updates.values():
        step.close()
    return times


def measure_memory_child(
    method: str, strategy: str, size: int, device_name: str, setup: Setup
) -> dict[str, float]:
    """Run in a child process: return the peak extra memory (MiB) of two steps of one case."""
    torch.set_num_threads(THREADS)
    device = torch.device(device_name)
    model = build_unet(encoder=setup.encoder).to(device)
    images, targets = make_batch(size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6)
    # The step object and its RS mask last a whole refresh window, like the model, so
    # the peak counts only what the updates themselves allocate.
    step = build_step(Case(method, strategy), model, device, setup.rs_rate)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _proc_status_kib("VmRSS") * 1024
    for _ in range(2):
        timed_update(step, optimizer, images, targets, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"extra_mib": (peak - baseline) / 2**20, "tensor_mib": (peak - baseline) / 2**20}
    peak = _proc_status_kib("VmHWM") * 1024
    return {"extra_mib": (peak - baseline) / 2**20, "tensor_mib": _tensor_peak_mib(step, optimizer, images, targets)}


def _tensor_peak_mib(step, optimizer, images, targets) -> float:
    """Return the peak of live tensor memory (MiB) during one CPU update, above its start.

    The resident set also counts memory that the C allocator keeps after tensors are
    freed (glibc's heap), so it depends on the order of allocations as well as on
    what the step needs at once. The profiler's allocation events count tensors alone.
    """
    from torch.profiler import ProfilerActivity, profile

    for param in step.params:
        param.grad = None  # start from the state before a step, as the first update did
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        timed_update(step, optimizer, images, targets, torch.device("cpu"))
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_of(case: Case, size: int, device: torch.device, setup: Setup) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--memory-child", case.method, case.strategy or "-",
        str(size), str(device), "--encoder", setup.encoder, "--rs-rate", repr(setup.rs_rate),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def environment_lines(device: torch.device) -> list[str]:
    import opacus
    import segmentation_models_pytorch as smp

    lines = [
        f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        f"load average before: {os.getloadavg()[0]:.2f}",
        f"python {platform.python_version()}, torch {torch.__version__}, opacus {opacus.__version__}, "
        f"segmentation-models-pytorch {smp.__version__}",
    ]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(
    cases: list[Case], sizes: list[int], rounds: int, devices: list[torch.device], setup: Setup, *, memory: bool
) -> None:
    for device in devices:
        print("\n".join(environment_lines(device)))
        for size in sizes:
            times = time_cases(cases, size, rounds, device, setup)
            nothing = {"extra_mib": float("nan"), "tensor_mib": float("nan")}
            extra = {case.label: memory_of(case, size, device, setup) if memory else nothing for case in cases}
            print(f"\n{device.type} {size}x{size}, {setup.encoder} U-Net, batch {BATCH}, RS rate "
                  f"{setup.rs_rate:g}, {rounds} interleaved rounds, load average after: {os.getloadavg()[0]:.2f}")
            print(_table(cases, times, extra))


def _table(
    cases: list[Case], times: dict[str, list[tuple[float, float, float]]], extra: dict[str, dict[str, float]]
) -> str:
    """Format medians of wall, CPU, system and user time, their ratios to ``none``, and extra memory."""
    def median(label: str, column: int) -> float:
        return statistics.median(t[column] for t in times[label])

    def user_median(label: str) -> float:
        return statistics.median(cpu - system for _, cpu, system in times[label])

    def memory(label: str, key: str) -> str:
        return f"{extra[label][key]:>11.0f}{extra[label][key] / extra['none'][key]:>7.2f}"

    lines = [f"{'case':<20}{'wall s':>9}{'ratio':>7}{'cpu s':>9}{'ratio':>7}{'sys s':>7}{'user ratio':>11}"
             f"{'min wall':>10}"
             f"{'extra MiB':>11}{'ratio':>7}{'tensor MiB':>11}{'ratio':>7}"]
    for case in cases:
        label = case.label
        lines.append(
            f"{label:<20}{median(label, 0):>9.3f}{median(label, 0) / median('none', 0):>7.2f}"
            f"{median(label, 1):>9.3f}{median(label, 1) / median('none', 1):>7.2f}"
            f"{median(label, 2):>7.2f}{user_median(label) / user_median('none'):>11.2f}"
            f"{min(t[0] for t in times[label]):>10.3f}"
            + memory(label, "extra_mib") + memory(label, "tensor_mib")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 cases, 3 rounds (a few minutes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides in pixels")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is available")
    parser.add_argument("--no-memory", action="store_true", help="time only, skip the memory children")
    parser.add_argument("--cases", nargs="+", metavar="METHOD/STRATEGY",
                        help="run only these cases (labels as in the table; 'none' is always added)")
    parser.add_argument("--encoder", default=Setup.encoder, help="U-Net encoder (default resnet34)")
    parser.add_argument("--rs-rate", type=float, default=Setup.rs_rate, help="RS rate of the rs cases (default 0.9)")
    parser.add_argument("--memory-child", nargs=4, metavar=("METHOD", "STRATEGY", "SIZE", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    setup = Setup(encoder=args.encoder, rs_rate=args.rs_rate)
    if args.memory_child:
        method, strategy, size, device = args.memory_child
        strategy = "" if strategy == "-" else strategy
        print(json.dumps(measure_memory_child(method, strategy, int(size), device, setup)))
        return
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = [Case("none", "")] + [Case(*label.split("/")) for label in args.cases if label != "none"]
    rounds = args.rounds or (3 if args.quick else 5)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    run(cases, args.sizes, rounds, devices, setup, memory=not args.no_memory)


if __name__ == "__main__":
    main()
