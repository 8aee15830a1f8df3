"""What uncertainty costs on EDM's full-size QM9 network: seconds per molecule on the CPU.

    python benchmarks/edm_cost.py --n 8 --steps 5 --draws 5
    python benchmarks/edm_cost.py --n 8 --steps 5 --draws 5 --tail 1 --repeats 3
    python benchmarks/edm_cost.py --n 2 --steps 5 --draws 5 --tail 1 --linearised

Builds EDM's QM9 architecture (n_layers 9, nf 256, attention, tanh; random weights, since the
published ones are not shipped) as an EDM output folder in a temporary directory, loads it with
``MoleculeUncertaintyPipeline.from_pretrained``, fits the head posterior on a few random
molecules, then times one generation of ``--n`` molecules (padded to EDM's 29 atoms) for each
setting: plain, variability (closed form), variability over M head draws, and the semantic score
(M + 1 trajectories).  ``--tail k`` then fits the block posterior over the last k EGNN blocks
and ``embedding_out`` (``tail=k``, the posterior that covers the position noise) on the same
molecules and times its Monte-Carlo variability (M block draws re-run on the MAP trajectory,
with the jackknife error) and its semantic score (M + 1 trajectories, the block re-run per
trajectory group); ``--linearised`` also times the block's first-order closed-form variance
at one step.  Random weights make the molecules meaningless, not the cost: every setting
runs the same network on the same shapes.  Each setting is timed ``--repeats`` times (median),
the settings taking turns so that a load that comes and goes hits all of them alike; the
ratios are of CPU seconds of this process (``time.process_time``, one thread), which a busy
shared machine changes far less than wall time; wall seconds are printed beside them.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genunc.pipelines import MoleculeUncertaintyPipeline
from genunc.zoo.edm import EDMModel
from genunc.zoo.edm_args import EDMConfig

QM9_ARGS = dict(model="egnn_dynamics", probabilistic_model="diffusion", n_layers=9, nf=256,
                inv_sublayers=1, attention=True, tanh=True, norm_constant=1, sin_embedding=False,
                condition_time=True, normalization_factor=1, aggregation_method="sum",
                diffusion_steps=1000, diffusion_noise_schedule="polynomial_2",
                diffusion_noise_precision=1e-5, normalize_factors=[1, 4, 10], include_charges=True,
                context_node_nf=0, conditioning=[], dataset="qm9", remove_h=False)


def write_folder(path: Path, seed: int = 0, values: dict = QM9_ARGS, build=None) -> Path:
    """An EDM-style output folder in ``path``: ``values`` as args.pickle, the random weights
    (under ``seed``) of ``build(args)`` (by default EDM's model) as generative_model_ema.npy."""
    args = argparse.Namespace(**values)
    (path / "args.pickle").write_bytes(pickle.dumps(args))
    torch.manual_seed(seed)
    model = build(args) if build else EDMModel(EDMConfig.from_namespace(args))
    torch.save(model.state_dict(), path / "generative_model_ema.npy")
    return path


def random_batches(pipe: MoleculeUncertaintyPipeline, n_batches: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        counts = torch.randint(9, 20, (size,), generator=g)
        mask = torch.arange(19)[None] < counts[:, None]
        positions = torch.randn(size, 19, 3, generator=g) * 1.5
        types = torch.randint(0, 5, (size, 19), generator=g)
        out.append({"x": pipe.adapter.layout.encode(positions.numpy(), types.numpy(), mask.numpy()),
                    "node_mask": mask})
    return out


def cost_parser(description: str, model: str, n: int, blocks: str = "EGNN blocks") -> argparse.ArgumentParser:
    """The options of a molecule cost benchmark (``model``: whose sampler steps, ``n``: the
    default molecules per generation, ``blocks``: what ``--tail`` counts)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=n, help="molecules per generation")
    parser.add_argument("--steps", type=int, default=5, help=f"sampler steps ({model}: 1000)")
    parser.add_argument("--draws", type=int, default=5, help="posterior draws M")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    parser.add_argument("--tail", type=int, default=0,
                        help=f"also time a block posterior over the last TAIL {blocks} (0: no)")
    return parser


def timed_fit(pipe: MoleculeUncertaintyPipeline, **kwargs):
    """``pipe.fit_posterior`` on 2 batches of 8 random molecules: (the posterior, wall seconds)."""
    start = time.perf_counter()
    posterior = pipe.fit_posterior(random_batches(pipe, 2, 8), progress=False, **kwargs)
    return posterior, time.perf_counter() - start


def time_head_settings(pipe: MoleculeUncertaintyPipeline, args: argparse.Namespace) -> float:
    """Warm up, print the run's sizes and the table's header, and time plain generation,
    variability (closed form and over M draws) and the semantic score; returns the base (CPU
    s/molecule of plain)."""
    print(f"CPU, {args.threads} thread(s); {args.n} molecules padded to 29 atoms, {args.steps} steps, "
          f"M = {args.draws}, sampler {pipe.adapter.default_sampler}; median of {args.repeats} run(s)")
    settings = [("plain", dict(scores=())),
                ("variability (closed form)", dict(scores=("variability",))),
                (f"variability ({args.draws} draws)", dict(scores=("variability",), variance="monte_carlo")),
                (f"semantic ({args.draws} + 1 trajectories)", dict(scores=("semantic",)))]
    pipe(args.n, num_inference_steps=1, progress=False, chunk_size=args.n, scores=())  # warm-up
    print(f"{'setting':<40} {'CPU s/mol':>10} {'CPU s/mol/step':>16} {'vs plain':>9} "
          f"{'wall s/mol':>9}")
    return run_settings(pipe, settings, args)


def time_block_settings(pipe: MoleculeUncertaintyPipeline, args: argparse.Namespace, base: float) -> None:
    """The fitted block posterior's Monte-Carlo variability and semantic score, against ``base``."""
    block = [(f"block variability ({args.draws} draws)",
              dict(scores=("variability",), variance="monte_carlo")),
             (f"block semantic ({args.draws} + 1 trajectories)", dict(scores=("semantic",)))]
    run_settings(pipe, block, args, base)


def main() -> None:
    parser = cost_parser(__doc__, "EDM", 8)
    parser.add_argument("--linearised", action="store_true",
                        help="with --tail: also time the block's linearised closed-form variance "
                        "(TailPosterior.linearised_output_variance) at one step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        pipe = MoleculeUncertaintyPipeline.from_pretrained(write_folder(Path(tmp)))
    n_params = sum(p.numel() for p in pipe.model.parameters())
    head = sum(p.numel() for p in pipe.adapter.head.parameters())
    _, fit = timed_fit(pipe)
    print(f"EDM QM9 architecture: {n_params:,} parameters, head {pipe.adapter.head_name} "
          f"({head:,} parameters); posterior fit on 32 noised random molecules: {fit:.1f} s")
    base = time_head_settings(pipe, args)
    if args.tail:
        posterior, fit = timed_fit(pipe, tail=args.tail)
        print(f"block posterior over {posterior.names} ({posterior.n_params:,} parameters, "
              f"curvature {posterior.info['curvature']}): fit on the same 32 molecules {fit:.1f} s")
        time_block_settings(pipe, args, base)
        if args.linearised:
            time_linearised(pipe, args, base)
    print("(EDM samples with 1000 steps: multiply the per-step figure by 1000 for one molecule)")


def time_linearised(pipe: MoleculeUncertaintyPipeline, args: argparse.Namespace, base: float) -> None:
    """CPU seconds of the block's first-order closed-form variance at one step (the MAP's
    recorded block inputs of ``--n`` molecules at a middle noise level), against one plain step."""
    tail = pipe.posterior.tail
    mask = torch.arange(29)[None] < torch.tensor([29, 25, 19, 23, 27, 21, 17, 29] * args.n)[: args.n, None]
    g = torch.Generator().manual_seed(0)
    x = pipe.adapter.project(torch.randn(args.n, 29, pipe.adapter.layout.width, generator=g),
                             {"node_mask": mask})
    with torch.no_grad(), tail.capture() as record:
        pipe.adapter.denoise(x, torch.full((args.n,), 500), mask)
        inputs = tail.inputs_of(record, args.n)
    start = time.process_time()
    pipe.posterior.linearised_output_variance(inputs)
    per_molecule = (time.process_time() - start) / args.n
    print(f"{'block linearised closed form, one step':<40} {per_molecule:10.3f} {per_molecule:16.4f} "
          f"{per_molecule / (base / args.steps):8.2f}x of a plain step (one run)")


def run_settings(pipe: MoleculeUncertaintyPipeline, settings: list, args: argparse.Namespace,
                 base: float | None = None) -> float:
    """Time every setting ``--repeats`` times, in turns; print CPU s/molecule, the ratio to the
    first setting (plain) and wall s/molecule.  Returns the base (CPU s/molecule of plain)."""
    cpu: dict[str, list[float]] = {name: [] for name, _ in settings}
    wall: dict[str, list[float]] = {name: [] for name, _ in settings}
    for _ in range(args.repeats):
        for name, kwargs in settings:
            start, start_cpu = time.perf_counter(), time.process_time()
            pipe(args.n, num_draws=args.draws, num_inference_steps=args.steps, progress=False,
                 chunk_size=args.n, **kwargs)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    for name, _ in settings:
        per_molecule = statistics.median(cpu[name]) / args.n
        base = base or per_molecule
        print(f"{name:<40} {per_molecule:10.3f} {per_molecule / args.steps:16.4f} "
              f"{per_molecule / base:8.2f}x {statistics.median(wall[name]) / args.n:9.3f}")
    return base


if __name__ == "__main__":
    main()
