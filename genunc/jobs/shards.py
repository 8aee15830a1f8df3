"""Running one export as several processes (``torchrun``, ``accelerate launch``), merged into one.

genunc brings no cluster of its own: it reads the launcher's ``RANK`` / ``WORLD_SIZE`` (both
launchers set them), gives each process a contiguous block of global sample indices (accelerate's
``split_between_processes`` rule: the first ``n % W`` processes take one extra), and lets each
write its own shard export.  Sample i draws from the streams of (seed, i), and the head draws
from the run seed alone, so a sample is the same whichever process made it and however many ran.
The processes never talk to each other: the last one to finish merges the shards into the export
a single process would have written, and ``genunc merge`` does the same by hand.

Layout::

    <out>/                        the merged export (what filter / evaluate read)
    <out>.shards/rank-00000-of-00002/, rank-00001-of-00002/   one resumable export each
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genunc.errors import GenuncError, MissingFileError
from genunc.export.store import MANIFEST, RUN, Export, being_written, merge_exports

_SHARD_NAME = re.compile(r"rank-(\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class ProcessShard:
    """This process's place in a launch: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise GenuncError(f"rank {self.rank} of world size {self.world_size} is not a process "
                              "of the launch")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "ProcessShard":
        """The launcher's ``RANK`` and ``WORLD_SIZE`` (torchrun and accelerate set both); one
        process where neither is set."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        try:
            rank, world_size = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        except ValueError:
            raise GenuncError(f"RANK={env.get('RANK')!r} and WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                              "must be whole numbers") from None
        return cls(rank, world_size)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def indices(self, n: int) -> range:
        """This process's contiguous block of the global indices ``0 .. n-1``."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    @property
    def name(self) -> str:
        return f"rank-{self.rank:05d}-of-{self.world_size:05d}"

    def directory(self, out: str | os.PathLike[str]) -> Path:
        """Where this process writes its shard of the export `out`."""
        return shards_root(out) / self.name


def shards_root(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.shards"


def shard_info(shard: ProcessShard, ids: range) -> dict[str, Any]:
    """What a shard's ``run.json`` records about its place in the launch."""
    return {"rank": shard.rank, "world_size": shard.world_size, "first": ids.start,
            "stop": ids.stop}


def shard_complete(directory: Path) -> bool:
    """Whether a shard export holds every sample of its block and its writer has let go (each
    process asks after closing its own shard, so the last to close sees every shard done)."""
    if not (directory / RUN).exists() or not (directory / MANIFEST).exists():
        return False
    if being_written(directory):  # its process is still finalizing
        return False
    info = json.loads((directory / RUN).read_text()).get("shard") or {}
    expected = info.get("stop", 0) - info.get("first", 0)
    return (directory / MANIFEST).read_bytes().count(b"\n") >= expected


def merge_shards(out: str | os.PathLike[str], world_size: int | None = None) -> Export:
    """Merge the shard exports of `out` into `out`, checking that every global index from 0 to
    ``n_samples - 1`` is there exactly once; safe to call from several processes at once (one
    merges, the others find it done) and again later (an up-to-date merge is left as it is)."""
    out = Path(out)
    root = shards_root(out)
    found = sorted(p for p in root.glob("rank-*-of-*") if _SHARD_NAME.search(p.name)) \
        if root.is_dir() else []
    if not found:
        raise MissingFileError(f"no shards of {out} in {root}")
    sizes = {int(_SHARD_NAME.search(p.name).group(2)) for p in found}
    if world_size is None:
        if len(sizes) > 1:
            raise GenuncError(f"{root} holds shards of launches with {sorted(sizes)} processes; "
                              "pass the world size to merge (--world-size)")
        world_size = sizes.pop()
    expected = [ProcessShard(r, world_size).directory(out) for r in range(world_size)]
    missing = [p.name for p in expected if not (p / RUN).exists()]
    if missing:
        raise GenuncError(f"cannot merge {out}: shard(s) {', '.join(missing)} were never started "
                          f"(of {world_size}); run the launch again to complete them")
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".merge.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sources = [Export(p) for p in expected]
        _check_coverage(sources, [p.name for p in expected])
        merged = out / RUN
        if merged.exists():
            run = json.loads(merged.read_text())
            if run.get("merged_from") == [p.name for p in expected] and \
                    len(Export(out)) == sum(len(s) for s in sources):
                return Export(out)
        return merge_exports(sources, out, [p.name for p in expected])


def _check_coverage(sources: list[Export], names: list[str]) -> None:
    """Every shard holds exactly its block, and the blocks tile ``0 .. n-1``."""
    stop = 0
    for name, source in zip(names, sources):
        info = source.metadata.get("shard") or {}
        if info.get("first") != stop:
            raise GenuncError(f"shard {name} starts at sample {info.get('first')}, expected {stop}")
        block = range(info["first"], info["stop"])
        have = {int(r["sample_id"]) for r in source.records}
        missing = [i for i in block if i not in have]
        if missing:
            head = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise GenuncError(f"shard {name} holds {len(block) - len(missing)} of its {len(block)} "
                              f"samples (missing {head}); run the launch again to complete it")
        stray = sorted(have - set(block))
        if stray:
            raise GenuncError(f"shard {name} holds samples outside its block: {stray[:10]}")
        stop = info["stop"]
    n = (sources[0].metadata.get("identity") or {}).get("generate.n_samples", stop)
    if stop != n:
        raise GenuncError(f"the shards cover samples 0 to {stop - 1} of {n}")


def wait_for(paths: list[Path], timeout: float, what: str, poll: float = 1.0) -> None:
    """Block until every path exists (another process is writing them), or fail after `timeout`
    seconds saying what was awaited."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise GenuncError(f"waited {timeout:.0f} s for {what} ({paths[0].parent}); is rank 0 "
                              "running? Fit it first with `genunc fit` to skip the wait")
        time.sleep(poll)


def process_device(device: str, environ: Mapping[str, str] | None = None) -> str:
    """``cuda`` means this process's own GPU under a launcher (``cuda:<LOCAL_RANK>``); any other
    device, or an explicit ``cuda:<i>``, is used as given."""
    env = os.environ if environ is None else environ
    if device == "cuda" and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device
