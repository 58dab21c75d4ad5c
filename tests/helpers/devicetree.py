"""A fake medical-device filesystem (patient data, service logs, firmware, scratch) under a tmp dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fixtures.patientdata import write_device_tree

__all__ = ["DeviceTree", "make_device_tree"]

_SYSTEM_LOG = (
    "2026-11-28T08:00:01Z boot: firmware 4.2.1 started\n"
    "2026-11-28T08:00:03Z tube: warm-up complete, 42 kV idle\n"
    "2026-11-28T09:15:44Z gantry: rotation error E-1207 cleared by operator\n"
)


@dataclass(frozen=True)
class DeviceTree:
    """Paths of a fake device filesystem made by make_device_tree.

    root: the tree's top; dicom_dir: root/data/dicom; dicom_files: every file under it (DICOM Part 10
    with and without extension, a DICOMDIR file-set); system_log: root/service/logs/system.log;
    firmware_dir: root/service/firmware (holds version.txt); tmp_dir: root/tmp (writable scratch; it
    also holds patient data in disguise); patient: the named paths from
    fixtures.patientdata.write_device_tree (hl7_file, astm_file, renamed_dicom, link_into_dicom, ...).
    """

    root: Path
    dicom_dir: Path
    dicom_files: tuple[Path, ...]
    system_log: Path
    firmware_dir: Path
    tmp_dir: Path
    patient: dict[str, Path] = field(default_factory=dict)


def make_device_tree(root: Path | str) -> DeviceTree:
    """Create the fake device filesystem under `root` (created if missing) and return its paths.

    Content comes from tests/fixtures/patientdata.py (synthetic DICOM, HL7, ASTM, benign vendor files,
    a symlink from tmp/ into data/dicom); this adds service/logs/system.log and
    service/firmware/version.txt. Raises FileExistsError if root/service already exists.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    patient = write_device_tree(root)
    logs = root / "service" / "logs"
    logs.mkdir(parents=True, exist_ok=False)
    system_log = logs / "system.log"
    system_log.write_text(_SYSTEM_LOG)
    firmware = root / "service" / "firmware"
    firmware.mkdir()
    (firmware / "version.txt").write_text("4.2.1\n")
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    dicom_dir = root / "data" / "dicom"
    return DeviceTree(
        root=root,
        dicom_dir=dicom_dir,
        dicom_files=tuple(sorted(p for p in dicom_dir.rglob("*") if p.is_file() and not p.is_symlink())),
        system_log=system_log,
        firmware_dir=firmware,
        tmp_dir=tmp,
        patient=patient,
    )
