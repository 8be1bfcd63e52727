"""WebDataset tar shards of clips or latents, and the ``index.json`` that describes them.

Layout of a data root::

    index.json                      kind, shapes, dtype, splits -> shards + counts, per-source calibration
    train/<prefix>-000000.tar       samples <key>.clip.npy (or <key>.latent.npy) + <key>.meta.json
    val/<prefix>-000000.tar

Clips are stored as integer ADU (uint16/int16 ``[T, H, W]``), latents as float16/float32 ``[C, T, H, W]``;
normalization happens when reading (``pipeline.py``). Keys contain no dots, so WebDataset splits
``<key>.<ext>`` correctly. Every shard is written under a temporary name and renamed when complete, so a
crash never leaves a half-written shard under its final name, and a re-run skips the shards that exist.

index.json::

    {"kind": "clips" | "latents", "clip_shape" | "latent_shape": [...], "dtype": "uint16",
     "splits": {"train": {"shards": [{"path": "train/clips-000000.tar", "count": 64}], "num_clips": 64}, ...},
     "sources": {source_id: {"calibration", "gain", "offset", "read_noise", "rate_hz", "recording", ...}},
     # calibration "none": gain/offset null, "raw": {"center", "scale", "noise_std", "zero", "step", ...}
     "normalization": {"kind": "photon" | "anscombe" | "raw", "center", "scale"},
     # latents only: "channel_mean", "channel_std", "stage1"}
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cadiff import storage
from cadiff.data.movie import NORMALIZATION_KINDS, calibration_problem
from cadiff.errors import DataError
from cadiff.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MEMBERS = {"clips": "clip.npy", "latents": "latent.npy"}
SHAPE_KEYS = {"clips": "clip_shape", "latents": "latent_shape"}
DTYPES = {"clips": ("uint16", "int16"), "latents": ("float16", "float32")}
META_MEMBER = "meta.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

Sample = tuple[str, np.ndarray, dict]


def kind_of(array: np.ndarray) -> str:
    """``clips`` for integer arrays, ``latents`` for float arrays."""
    return "latents" if np.issubdtype(array.dtype, np.floating) else "clips"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical input, identical bytes
    tar.addfile(info, io.BytesIO(data))


def _check_sample(key: str, array: np.ndarray, kind: str, shape: tuple | None) -> None:
    if not _KEY_RE.match(key):
        raise DataError(f"sample key {key!r}: expected letters, digits, '_' or '-' only (no dots, WebDataset splits on them)")
    if str(array.dtype) not in DTYPES[kind]:
        raise DataError(f"sample {key}: dtype {array.dtype}, expected one of {DTYPES[kind]} for {kind} shards")
    if array.ndim != (3 if kind == "clips" else 4):
        raise DataError(f"sample {key}: shape {array.shape}, expected {'[T, H, W]' if kind == 'clips' else '[C, T, H, W]'}")
    if shape is not None and tuple(array.shape) != shape:
        raise DataError(f"sample {key}: shape {tuple(array.shape)}, expected {shape} like the first sample")


def shard_path(out_dir: str | Path, split: str, prefix: str, number: int) -> Path:
    return Path(out_dir) / split / f"{prefix}-{number:06d}.tar"


def _member_names(path: Path) -> list[str] | None:
    try:
        with tarfile.open(path, "r:") as tar:
            return tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return None


def write_shards(samples: Iterable[Sample], out_dir: str | Path, split: str, prefix: str = "clips",
                 clips_per_shard: int = 64, kind: str | None = None) -> list[dict[str, Any]]:
    """Write ``(key, array, meta)`` samples into ``out_dir/split/<prefix>-NNNNNN.tar`` shards.

    Returns ``[{"path": <relative to out_dir>, "count": n}]``. A shard that already exists with exactly the
    expected members is kept (resume after an interruption); stale shards of the same prefix beyond the
    new count are removed. The caller keeps re-runs content-identical (prepare_data fingerprints its config).
    """
    if clips_per_shard < 1:
        raise DataError(f"clips_per_shard {clips_per_shard}: expected >= 1")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    infos: list[dict[str, Any]] = []
    shape: tuple | None = None
    seen: set[str] = set()
    group: list[Sample] = []

    def flush() -> None:
        path = shard_path(out_dir, split, prefix, len(infos))
        member = MEMBERS[kind]  # type: ignore[index]
        names = [n for key, _, _ in group for n in (f"{key}.{member}", f"{key}.{META_MEMBER}")]
        if path.exists() and _member_names(path) == names:
            log.debug("shard %s complete, skipped", path)
        else:
            with atomic_path(path) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for key, array, meta in group:
                        _add_member(tar, f"{key}.{member}", _npy_bytes(array))
                        _add_member(tar, f"{key}.{META_MEMBER}", json.dumps(meta, sort_keys=True).encode())
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are read by other users' Ray workers
        infos.append({"path": path.relative_to(out_dir).as_posix(), "count": len(group)})
        group.clear()

    for key, array, meta in samples:
        array = np.asarray(array)
        kind = kind or kind_of(array)
        _check_sample(key, array, kind, shape)
        shape = tuple(array.shape)
        if key in seen:
            raise DataError(f"sample key {key!r} appears twice in split '{split}'; keys must be unique")
        seen.add(key)
        group.append((key, array, meta))
        if len(group) == clips_per_shard:
            flush()
    if group:
        flush()
    keep = {Path(i["path"]).name for i in infos}
    for stale in (out_dir / split).glob(f"{prefix}-*.tar"):
        if stale.name not in keep:
            log.info("removing stale shard %s", stale)
            stale.unlink()
    return infos


# ---------------------------------------------------------------------------------------------------------
# index


def _fail(path: Path, msg: str) -> DataError:
    return DataError(f"{path}: {msg}")


def validate_index(index: Any, path: str | Path, root: str | Path | None = None) -> dict:
    """Check the structure of an index dict (and, with ``root``, that its shards exist)."""
    if not isinstance(index, dict):
        raise _fail(path, f"expected a JSON object, got {type(index).__name__}")
    kind = index.get("kind")
    if kind not in MEMBERS:
        raise _fail(path, f"'kind' = {kind!r}, expected 'clips' or 'latents'")
    shape_key = SHAPE_KEYS[kind]
    shape = index.get(shape_key)
    ndim = 3 if kind == "clips" else 4
    if not (isinstance(shape, list) and len(shape) == ndim and all(isinstance(s, int) and s > 0 for s in shape)):
        raise _fail(path, f"'{shape_key}' = {shape!r}, expected {ndim} positive integers")
    if index.get("dtype") not in DTYPES[kind]:
        raise _fail(path, f"'dtype' = {index.get('dtype')!r}, expected one of {DTYPES[kind]}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise _fail(path, "'splits' missing, expected {'train': {'shards': [...], 'num_clips': n}, ...}")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            raise _fail(path, f"split '{name}' has no 'shards' list")
        for shard in shards:
            if not (isinstance(shard, dict) and isinstance(shard.get("path"), str)
                    and isinstance(shard.get("count"), int) and shard["count"] >= 0):
                raise _fail(path, f"split '{name}': shard entry {shard!r}, expected {{'path': str, 'count': int}}")
            if root is not None and not storage.is_file(storage.join(root, shard["path"])):
                raise DataError(f"{storage.join(root, shard['path'])}: shard listed in {path} is missing")
        total = sum(s["count"] for s in shards)
        if split.get("num_clips", total) != total:
            raise _fail(path, f"split '{name}': num_clips {split.get('num_clips')} != sum of shard counts {total}")
    if not isinstance(index.get("sources", {}), dict):
        raise _fail(path, "'sources' must map source ids to calibration dicts")
    norm = index.get("normalization")
    if kind == "clips":
        if not (isinstance(norm, dict) and norm.get("kind") in NORMALIZATION_KINDS
                and isinstance(norm.get("center"), (int, float)) and isinstance(norm.get("scale"), (int, float))
                and norm["scale"] > 0):
            raise _fail(path, f"'normalization' = {norm!r}, expected {{'kind': {'|'.join(NORMALIZATION_KINDS)}, "
                              "'center', 'scale' > 0}")
        for sid, calib in index.get("sources", {}).items():
            problem = calibration_problem(calib, norm["kind"])
            if problem:
                raise _fail(path, f"source {sid!r} calibration: {problem}")
    else:
        channels = shape[0]
        for key in ("channel_mean", "channel_std"):
            values = index.get(key)
            if not (isinstance(values, list) and len(values) == channels):
                raise _fail(path, f"'{key}' = {values!r}, expected {channels} numbers (one per latent channel)")
        if any(s <= 0 for s in index["channel_std"]):
            raise _fail(path, "'channel_std' must be positive")
    return index


def read_index(root: str | Path, check_files: bool = True) -> dict:
    """Load and validate ``root/index.json`` (a local folder or a storage URI); errors name the file and the
    offending key."""
    path = storage.join(root, INDEX_NAME)
    if not storage.is_file(path):
        raise DataError(f"{path}: missing; expected a data folder written by prepare_data or encode_latents")
    try:
        index = json.loads(storage.read_text(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return validate_index(index, path, root if check_files else None)


def write_index(root: str | Path, index: dict) -> Path:
    """Validate and atomically write ``root/index.json``."""
    root = Path(root)
    path = root / INDEX_NAME
    validate_index(index, path, root)
    write_json_atomic(path, index)
    return path


def index_shape(index: dict) -> tuple[int, ...]:
    return tuple(index[SHAPE_KEYS[index["kind"]]])


def split_shards(root: str | Path, index: dict, split: str) -> list[tuple[str | Path, int]]:
    """``[(shard path or URI, count)]`` of a split; an unknown split is a DataError."""
    if split not in index["splits"]:
        raise DataError(f"{storage.join(root, INDEX_NAME)}: no split '{split}', available: {sorted(index['splits'])}")
    return [(storage.join(root, s["path"]), int(s["count"])) for s in index["splits"][split]["shards"]]


# ---------------------------------------------------------------------------------------------------------
# reading


def _decode(path: Path, key: str, members: dict[str, bytes], kind: str | None,
            expected_shape: tuple | None) -> Sample:
    array_name = next((m for m in members if m in MEMBERS.values()), None)
    if array_name is None or META_MEMBER not in members:
        raise DataError(f"{path}: sample {key!r} has members {sorted(members)}, expected "
                        f"{MEMBERS.get(kind or 'clips')} and {META_MEMBER}")
    if kind is not None and array_name != MEMBERS[kind]:
        raise DataError(f"{path}: sample {key!r} holds {array_name}, expected {MEMBERS[kind]} ({kind} shards)")
    try:
        array = np.load(io.BytesIO(members[array_name]), allow_pickle=False)
        meta = json.loads(members[META_MEMBER])
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: sample {key!r} cannot be decoded ({exc}); corrupt shard") from exc
    if expected_shape is not None and tuple(array.shape) != tuple(expected_shape):
        raise DataError(f"{path}: sample {key!r} has shape {tuple(array.shape)}, expected {tuple(expected_shape)} "
                        "from index.json")
    stored_kind = kind or ("clips" if array_name == MEMBERS["clips"] else "latents")
    if str(array.dtype) not in DTYPES[stored_kind]:
        # a float array in a clip shard would be normalized as if it were ADU: refuse it instead
        raise DataError(f"{path}: sample {key!r} has dtype {array.dtype}, expected one of {DTYPES[stored_kind]} "
                        f"({stored_kind} shards)")
    return key, array, meta


def iter_shard(path: str | Path, kind: str | None = None, expected_shape: tuple | None = None) -> Iterator[Sample]:
    """Yield ``(key, array, meta)`` from one shard (a local path or a storage URI, streamed); a corrupt/truncated
    shard raises DataError naming it."""
    key, members = None, {}
    try:
        with storage.open_input(path) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                k, _, ext = base.partition(".")
                if key is not None and k != key:
                    yield _decode(path, key, members, kind, expected_shape)
                    members = {}
                key = k
                fh = tar.extractfile(info)
                members[ext] = fh.read() if fh is not None else b""
                if len(members[ext]) != info.size:
                    raise DataError(f"{path}: member {info.name} is truncated; corrupt shard")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated shard ({exc}); expected a tar of <key>.npy/<key>.json") from exc
    if key is not None:
        yield _decode(path, key, members, kind, expected_shape)


class IndexedShards:
    """Random access to every sample of a split: member offsets are read once from the tar headers."""

    def __init__(self, root: str | Path, split: str, index: dict | None = None,
                 keep: set[str | Path] | None = None) -> None:
        self.root = root
        self.index = index or read_index(root)
        self.kind = self.index["kind"]
        self.shape = index_shape(self.index)
        self.shards = [p for p, _ in split_shards(self.root, self.index, split) if keep is None or p in keep]
        self.entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for shard_no, path in enumerate(self.shards):
            for key, members in self._scan(path).items():
                self.entries.append((shard_no, key, members))
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def _scan(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
        out: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with storage.open_input(path) as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(0)
                with tarfile.open(fileobj=fh, mode="r:") as tar:
                    for info in tar.getmembers():
                        if info.isfile():
                            key, _, ext = os.path.basename(info.name).partition(".")
                            out.setdefault(key, {})[ext] = (info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated shard ({exc})") from exc
        for key, members in out.items():
            for ext, (offset, n) in members.items():
                if offset + n > size:
                    raise DataError(f"{path}: member {key}.{ext} extends past the end of the file; truncated shard")
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def _handle(self, shard_no: int) -> Any:
        if self._pid != os.getpid():  # forked DataLoader worker: never share file offsets with the parent
            self._handles, self._pid = {}, os.getpid()
        if shard_no not in self._handles:
            self._handles[shard_no] = storage.open_input(self.shards[shard_no])  # cached handle
        return self._handles[shard_no]

    def __getitem__(self, i: int) -> Sample:
        shard_no, key, members = self.entries[i]
        fh = self._handle(shard_no)
        raw = {}
        for ext, (offset, n) in members.items():
            fh.seek(offset)
            raw[ext] = fh.read(n)
        return _decode(self.shards[shard_no], key, raw, self.kind, self.shape)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}



