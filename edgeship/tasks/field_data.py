"""The field split: samples the devices uploaded (edgeship.device.field_upload), pulled into the data set.

`pull(source, out_dir)` (`edgeship data field`) downloads every sample and late label under the field prefix
that `out_dir/objects/` does not hold yet, then rebuilds the split from all of them:

    out_dir/objects/<channel>/<target>/<device>/<sample>.npz (+ .label.json)   as uploaded
    out_dir/train.npz, out_dir/test.npz     labelled images (x, y); a sample goes to test by the hash of its id
                                            (`test_fraction`), so it stays on its side as samples accumulate
    out_dir/field.json                      lineage: source, counts, devices, versions, reasons, sha256 of each split

and, in a DVC repository, `dvc add`s the directory (out_dir.dvc: the split's own lineage, beside dvc.lock's
for the lab data). Samples without a label are kept in objects/ but are in neither split.

The release flow (edgeship.flows.release) trains on the lab train split plus field train when `field_data.use`
and out_dir/train.npz exist (`with_field_split`), and reports accuracy on the lab test and field test splits
separately (`field_test_accuracy` beside `test_accuracy`).

    >>> report = pull("s3://ota-bucket/field", Path("data/field"), endpoint_url=None)
    >>> report.counts                     # {"train": 812, "test": 344, "unlabelled": 90}
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeship.errors import DataError
from edgeship.files import sha256_of, write_atomic
from edgeship.records.field import SampleLabel, SampleMeta
from edgeship.tasks.data import write_npz


@dataclass
class FieldPull:
    source: str
    downloaded: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    devices: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    dvc: str = "not a DVC repository"


def pull(source: str, out_dir: Path, endpoint_url: str | None = None, input_shape: tuple | None = None,
         classes: int | None = None, test_fraction: float = 0.3, dvc_root: Path | None = None) -> FieldPull:
    """Download new samples from `source` (s3://bucket/prefix) and rebuild the field split in `out_dir`."""
    from edgeship.device.field_upload import split_url
    from edgeship.ota.storage import S3Storage, StorageError

    try:
        bucket, prefix = split_url(source)
        if not prefix:
            raise ValueError(f"field samples live under a prefix of the bucket (s3://{bucket}/field), not its root")
    except ValueError as error:
        raise DataError(f"{error}; set rollout.channels.<channel>.field_samples.upload_url or pass --source") from None
    storage = S3Storage(bucket, "", endpoint_url)
    objects = Path(out_dir) / "objects"
    report = FieldPull(source=source)
    try:
        for key in storage.list(prefix):
            name = key[len(prefix) + 1:]
            if not name.endswith((".npz", ".label.json")) or not _inside(name):
                report.skipped["other objects"] = report.skipped.get("other objects", 0) + 1
                continue
            if (objects / name).is_file():
                continue
            data = storage.get(key)
            if data is not None:
                write_atomic(objects / name, data)
                report.downloaded += 1
    except StorageError as error:
        raise DataError(f"cannot read field samples from {source}: {error}") from None
    build_split(Path(out_dir), report, input_shape, classes, test_fraction)
    if dvc_root is not None and (Path(dvc_root) / ".dvc").is_dir():
        report.dvc = _dvc_add(Path(dvc_root), Path(out_dir))
    return report


def source_of(params, channel: str | None = None) -> tuple[str | None, str | None]:
    """(s3 url, endpoint) to pull from: `field_data.source`, else the channel's `field_samples.upload_url`."""
    sampling = params.rollout.policy_for(channel or params.ota.channel).field_samples
    source = params.field_data.source or (sampling.upload_url if sampling else None)
    endpoint = params.field_data.endpoint_url or (sampling.endpoint_url if sampling else None) \
        or params.ota.s3_endpoint_url
    return source, endpoint


def pull_configured(params, root: Path, channel: str | None = None, source: str | None = None) -> FieldPull:
    """`pull` from where params.yaml says (or `source`), for the prepared data's input shape and classes."""
    from edgeship.tasks.data import read_prepared

    configured, endpoint = source_of(params, channel)
    source = source or configured
    if not source:
        raise DataError("no field samples to pull: set field_data.source (s3://bucket/prefix) or the channel's "
                        "rollout.channels.<channel>.field_samples, or pass --source")
    prepared_dir = Path(root) / params.data.prepared_dir
    prepared = read_prepared(prepared_dir) if (prepared_dir / "meta.json").is_file() else None
    return pull(source, Path(root) / params.field_data.dir, endpoint, prepared.input_shape if prepared else None,
                len(prepared.classes) if prepared else None, params.field_data.test_fraction, Path(root))


def build_split(out_dir: Path, report: FieldPull, input_shape: tuple | None, classes: int | None,
                test_fraction: float) -> None:
    """train.npz / test.npz / field.json from every sample under out_dir/objects."""
    objects = out_dir / "objects"
    late = {}
    for path in sorted(objects.rglob("*.label.json")):
        try:
            label = SampleLabel.model_validate_json(path.read_bytes())
            late[label.sample_id] = label.labels
        except ValueError:
            report.skipped["unreadable label"] = report.skipped.get("unreadable label", 0) + 1
    sides: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    devices = set()
    unlabelled = 0
    for path in sorted(objects.rglob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                x, labels = arrays["x"].astype(np.float32), arrays["labels"].astype(np.int64)
                meta = SampleMeta.model_validate_json(str(arrays["meta"]))
            if len(labels) != len(x):
                raise ValueError("one label per image")
        except (OSError, ValueError, KeyError):
            report.skipped["unreadable sample"] = report.skipped.get("unreadable sample", 0) + 1
            continue
        if meta.sample_id in late and len(late[meta.sample_id]) == len(labels):
            labels = np.asarray(late[meta.sample_id], dtype=np.int64)
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            report.skipped["other input shape"] = report.skipped.get("other input shape", 0) + len(x)
            continue
        devices.add(meta.device_id)
        report.versions[str(meta.version)] = report.versions.get(str(meta.version), 0) + len(x)
        report.reasons[meta.reason] = report.reasons.get(meta.reason, 0) + len(x)
        known = (labels >= 0) & (labels < classes if classes else True)
        unlabelled += int((~known).sum())
        side = "test" if _unit(meta.sample_id) < test_fraction else "train"
        sides[side][0].append(x[known])
        sides[side][1].append(labels[known])
    for side, (xs, ys) in sides.items():
        x = np.concatenate(xs) if xs else np.zeros((0, *(input_shape or (1, 1, 1))), np.float32)
        y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        write_npz(out_dir / f"{side}.npz", x=x, y=y)
        report.counts[side] = int(len(y))
        report.sha256[side] = sha256_of(out_dir / f"{side}.npz")
    report.counts["unlabelled"] = unlabelled
    report.devices = len(devices)
    lineage = {k: v for k, v in asdict(report).items() if k not in ("downloaded", "dvc")}
    write_atomic(out_dir / "field.json", (json.dumps(lineage, indent=2, sort_keys=True) + "\n").encode())


def _inside(name: str) -> bool:
    # A device may put any key under the prefix: none may write outside objects/ here.
    return not name.startswith("/") and posixpath.normpath(name) == name and not name.startswith("..")


def _unit(sample_id: str) -> float:
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2 ** 64


def _dvc_add(root: Path, out_dir: Path) -> str:
    dvc = shutil.which("dvc") or str(Path(__import__("sys").executable).with_name("dvc"))
    done = subprocess.run([dvc, "add", str(out_dir.resolve().relative_to(root.resolve()))], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DataError(f"`dvc add {out_dir}` failed: {done.stderr.strip()[-500:]}")
    return f"dvc add {out_dir} ({out_dir}.dvc)"


# --- the release's side: train and evaluate on it ----------------------------------------------------

def with_field_split(data, field_dir: Path, out_dir: Path):
    """`data` with the field split joined: train = lab train + field train, and `field_test` beside the lab test
    (in out_dir/data; the lab splits are linked, not copied). `data` itself when the field split is absent."""
    train_path, test_path = Path(field_dir) / "train.npz", Path(field_dir) / "test.npz"
    if not train_path.is_file() or not test_path.is_file():
        return data
    from edgeship.tasks.data import load_split

    joined = Path(out_dir) / "data"
    joined.mkdir(parents=True, exist_ok=True)
    for item in Path(data.directory).iterdir():
        target = joined / item.name
        if item.name != "train.npz" and not target.exists():
            target.symlink_to(item.resolve())
    x, y = load_split(data, "train")
    with np.load(train_path) as field_train:
        fx, fy = field_train["x"].astype(np.float32), field_train["y"]
    if len(fy) and tuple(fx.shape[1:]) != tuple(x.shape[1:]):
        raise DataError(f"field samples in {field_dir} have shape {fx.shape[1:]}, the data set {x.shape[1:]}; "
                        f"pull them again with `edgeship data field` for this model's input")
    write_npz(joined / "train.npz", x=np.concatenate([x, fx]), y=np.concatenate([y, fy]))
    shutil.copyfile(test_path, joined / "field_test.npz")
    field_hash = hashlib.sha256(sha256_of(train_path).encode() + sha256_of(test_path).encode()).hexdigest()[:12]
    counts = {**data.counts, "train": int(len(y) + len(fy)), "field_train": int(len(fy)),
              "field_test": int(_count(test_path))}
    return data.model_copy(update={"directory": joined, "counts": counts,
                                   "dvc_hash": f"{data.dvc_hash or 'unlocked'}+field-{field_hash}"})


def _count(path: Path) -> int:
    with np.load(path) as arrays:
        return len(arrays["y"])


def field_test_accuracy(trained, data) -> float | None:
    """Top-1 accuracy of the float model on the field test split (None without one)."""
    path = Path(data.directory) / "field_test.npz"
    if not path.is_file():
        return None
    import torch

    from edgeship.tasks.train import load_model

    with np.load(path) as arrays:
        x, y = arrays["x"].astype(np.float32), arrays["y"]
    if not len(y):
        return None
    model = load_model(trained).eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def read_sample(data: bytes) -> tuple[np.ndarray, np.ndarray, SampleMeta]:
    """(x, labels, meta) of one uploaded sample's bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return arrays["x"], arrays["labels"], SampleMeta.model_validate_json(str(arrays["meta"]))
