"""Patient-data policy: path normalisation, protected prefixes, SFTP decisions, the shipped policy file."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ConfigError
from sessions.policy import (
    MODES,
    PFLAG_APPEND,
    PFLAG_CREAT,
    PFLAG_READ,
    PFLAG_TRUNC,
    PFLAG_WRITE,
    SFTP_OPS,
    ProtectedPaths,
    load_protected_paths,
    normalize_path,
)
from sessions.sftp_codec import REQUEST_OPS

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "protected-paths.toml"

components = st.sampled_from(["data", "dicom", "dicomx", "x", ".", "..", "", "var", "lib", "orthanc", "ä", "a b"])
raw_paths = st.lists(components, max_size=10).map(lambda c: "/".join(c)) | st.text(max_size=60)


@pytest.fixture
def pp() -> ProtectedPaths:
    return ProtectedPaths.build("ct-01", ["/data/dicom/"], ["/var/lib/orthanc", "/var/spool/hl7"])


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("raw, cwd, expected", [
    ("/data/dicom", "/", "/data/dicom"),
    ("/data/dicom/", "/", "/data/dicom"),
    ("//data//dicom//", "/", "/data/dicom"),
    ("/data/./dicom/.", "/", "/data/dicom"),
    ("/data/x/../dicom", "/", "/data/dicom"),
    ("/../../data", "/", "/data"),
    ("..", "/home/svc", "/home"),
    ("dicom/x", "/data", "/data/dicom/x"),
    ("", "/tmp", "/tmp"),
    ("/", "/", "/"),
])
def test_normalize_path(raw: str, cwd: str, expected: str) -> None:
    assert normalize_path(raw, cwd) == expected


def _reference_normpath(path: str) -> str:
    """posixpath.normpath, plus POSIX's implementation-defined leading '//' folded to '/'."""
    norm = posixpath.normpath("/" + path)
    return "/" + norm.lstrip("/")


@given(raw_paths)
def test_normalize_path_matches_posixpath_and_is_idempotent(raw: str) -> None:
    once = normalize_path(raw)
    assert once == _reference_normpath(raw)
    assert normalize_path(once) == once
    assert once.startswith("/") and "//" not in once and (once == "/" or not once.endswith("/"))
    assert not {".", ".."} & set(once.split("/"))


@given(st.lists(components, max_size=8))
def test_dotdot_never_escapes_protection(parts: list[str]) -> None:
    pp = ProtectedPaths.build("ct-01", ["/data/dicom"])
    path = "/data/dicom/" + "/".join(parts)
    # The decision equals the decision on the normalised path, which is what the device would open.
    assert pp.is_protected(path) == pp.is_protected(normalize_path(path))
    norm = normalize_path(path)
    assert pp.is_protected(path) == (norm == "/data/dicom" or norm.startswith("/data/dicom/"))
    if ".." not in parts:  # going only down from a protected prefix stays protected
        assert pp.is_protected(path)


def test_prefix_is_component_wise(pp: ProtectedPaths) -> None:
    assert pp.is_protected("/data/dicom")
    assert pp.is_protected("/data/dicom/2026/IM000001")
    assert pp.is_protected("/data//dicom/./x")
    assert not pp.is_protected("/data/dicomx")
    assert not pp.is_protected("/data/dicom.bak/x")
    assert not pp.is_protected("/data")
    assert pp.protecting("/var/lib/orthanc/db/0a/9b/x") == "/var/lib/orthanc"


def test_reveals_marks_ancestors_only(pp: ProtectedPaths) -> None:
    assert pp.reveals("/") and pp.reveals("/data") and pp.reveals("/var/lib")
    assert not pp.reveals("/data/dicom")          # the tree itself is protected, not merely revealed
    assert not pp.reveals("/data/dicom/x")
    assert not pp.reveals("/data/dicomx")
    assert not pp.reveals("/tmp")
    assert pp.revealed_by("/var") == "/var/lib/orthanc"


def test_case_insensitive_devices() -> None:
    win = ProtectedPaths.build("xray-7", ["/C:/ProgramData/Vendor/PatientData"], case_insensitive=True)
    assert win.is_protected("/c:/programdata/vendor/patientdata/1.dcm")
    assert not ProtectedPaths.build("ct-01", ["/data/dicom"]).is_protected("/DATA/DICOM/x")


@pytest.mark.parametrize("bad", ["data/dicom", "", "/data/\ndicom", 7])
def test_build_rejects_bad_paths(bad: object) -> None:
    with pytest.raises(ConfigError, match="must be an absolute path"):
        ProtectedPaths.build("ct-01", [bad])  # type: ignore[list-item]


def test_build_normalises_and_dedupes() -> None:
    pp = ProtectedPaths.build("ct-01", ["/data/dicom/", "/data//dicom"], ["/data/dicom"])
    assert pp.prefixes == ("/data/dicom",)


# ---------------------------------------------------------------------------------------------- SFTP
def test_brief_reason_wording(pp: ProtectedPaths) -> None:
    d = pp.decide_sftp("opendir", ["/data/dicom"])
    assert not d.allowed and d.event == "sftp.denied" and d.op == "opendir" and d.path == "/data/dicom"
    assert d.reason == ("/data/dicom is a protected patient-data directory on ct-01; medbroker refuses reads, "
                        "writes and renames there. Ask the hospital's biomedical engineer if you need a "
                        "de-identified export.")
    inside = pp.decide_sftp("open", ["/data/dicom/2026/IM000001"], pflags=PFLAG_READ)
    assert inside.reason.startswith("/data/dicom/2026/IM000001 is inside /data/dicom, a protected "
                                    "patient-data directory on ct-01;")


SINGLE_PATH_OPS = ["open", "opendir", "stat", "lstat", "setstat", "remove", "mkdir", "rmdir", "realpath",
                   "readlink", "lsetstat", "statvfs", "expand-path"]


@pytest.mark.parametrize("op", SINGLE_PATH_OPS)
def test_every_path_op_is_refused_inside_and_allowed_outside(pp: ProtectedPaths, op: str) -> None:
    assert not pp.decide_sftp(op, ["/data/dicom/a.dcm"], pflags=PFLAG_READ).allowed
    assert not pp.decide_sftp(op, ["/var/spool/hl7"]).allowed
    ok = pp.decide_sftp(op, ["/var/log/vendor/service.log"], pflags=PFLAG_READ)
    assert ok.allowed and ok.event == "sftp.allowed" and ok.reason == ""


@pytest.mark.parametrize("op", ["rename", "posix-rename", "hardlink", "symlink"])
def test_two_path_ops_check_both_paths(pp: ProtectedPaths, op: str) -> None:
    out_of = pp.decide_sftp(op, ["/data/dicom/a.dcm", "/tmp/a.dcm"])
    into = pp.decide_sftp(op, ["/tmp/a.dcm", "/data/dicom/a.dcm"])
    assert not out_of.allowed and out_of.path == "/data/dicom/a.dcm"
    assert not into.allowed and into.path == "/data/dicom/a.dcm"
    moving_tree = pp.decide_sftp(op, ["/data", "/tmp/data"])
    assert not moving_tree.allowed and "contains the protected patient-data directory /data/dicom" in moving_tree.reason
    assert pp.decide_sftp(op, ["/tmp/a", "/tmp/b"]).allowed


def test_copy_data_is_always_refused(pp: ProtectedPaths) -> None:
    d = pp.decide_sftp("copy-data", [])
    assert not d.allowed and "would not pass" in d.reason


def test_unknown_ops_and_modes_are_refused(pp: ProtectedPaths) -> None:
    assert not pp.decide_sftp("check-file-name", ["/tmp/x"]).allowed
    assert not pp.decide_sftp("stat", ["/tmp/x"], mode="everything").allowed


def test_nul_in_path_is_refused(pp: ProtectedPaths) -> None:
    assert not pp.decide_sftp("stat", ["/tmp/x\0/../data/dicom"]).allowed


@pytest.mark.parametrize("op, pflags, allowed", [
    ("open", PFLAG_READ, True), ("open", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC, False),
    ("open", PFLAG_READ | PFLAG_APPEND, False), ("write", 0, False), ("setstat", 0, False), ("remove", 0, False),
    ("mkdir", 0, False), ("rmdir", 0, False), ("rename", 0, False), ("posix-rename", 0, False),
    ("symlink", 0, False), ("hardlink", 0, False), ("stat", 0, True), ("opendir", 0, True), ("read", 0, True),
])
def test_read_only_mode(pp: ProtectedPaths, op: str, pflags: int, allowed: bool) -> None:
    d = pp.decide_sftp(op, ["/tmp/x"] * (2 if op in ("rename", "posix-rename", "symlink", "hardlink") else 1),
                       mode="read-only", pflags=pflags)
    assert d.allowed is allowed
    if not allowed:
        assert d.reason.startswith("this grant is read-only: medbroker refuses") and "ct-01" in d.reason


@pytest.mark.parametrize("op, pflags, allowed", [
    ("open", PFLAG_READ, False), ("open", PFLAG_READ | PFLAG_WRITE, False), ("read", 0, False),
    ("open", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC, True), ("write", 0, True), ("stat", 0, True),
    ("opendir", 0, True), ("mkdir", 0, True),
])
def test_upload_only_mode(pp: ProtectedPaths, op: str, pflags: int, allowed: bool) -> None:
    d = pp.decide_sftp(op, ["/tmp/fw.bin"], mode="upload-only", pflags=pflags)
    assert d.allowed is allowed
    if not allowed:
        assert "this grant is upload-only" in d.reason


def test_protection_wins_over_mode(pp: ProtectedPaths) -> None:
    for mode in MODES:
        d = pp.decide_sftp("open", ["/data/dicom/x"], mode=mode, pflags=PFLAG_WRITE | PFLAG_CREAT)
        assert not d.allowed and "protected patient-data directory" in d.reason


def test_policy_knows_every_codec_op() -> None:
    assert REQUEST_OPS <= SFTP_OPS


@given(st.sampled_from(sorted(SFTP_OPS)), st.lists(raw_paths, max_size=3), st.sampled_from(MODES),
       st.integers(0, 0x3F))
def test_decide_sftp_is_total_and_never_allows_protected(op: str, paths: list[str], mode: str, pflags: int) -> None:
    pp = ProtectedPaths.build("ct-01", ["/data/dicom"])
    d = pp.decide_sftp(op, paths, mode=mode, pflags=pflags)
    assert d.event == ("sftp.allowed" if d.allowed else "sftp.denied")
    if any(pp.is_protected(p) for p in paths) or op == "copy-data":
        assert not d.allowed and d.reason


# ---------------------------------------------------------------------------------------------- policy file
def test_shipped_policy_file_loads() -> None:
    paths = load_protected_paths(SHIPPED)
    for expected in ("/data/dicom", "/var/lib/orthanc", "/srv/pacs", "/var/spool/hl7", "/opt/lis/data",
                     "/var/lib/mysql", "/var/lib/postgresql"):
        assert expected in paths
    assert len(paths) == len(set(paths)) and all(p.startswith("/") for p in paths)


@pytest.mark.parametrize("text, message", [
    ('[protected]\npaths = ["/data/dicom"]\nextra = 1\n', "unknown key protected.extra"),
    ('version = 2\n[protected]\npaths = []\n', "unknown key 'version'"),
    ('[protected]\npaths = ["data/dicom"]\n', "protected.paths[0] = 'data/dicom' is relative"),
    ('[protected]\npaths = ["/ok", "/data/di*"]\n', "protected.paths[1] = '/data/di*' is a glob pattern"),
    ('[protected]\npaths = ["/"]\n', "would protect every file"),
    ('[protected]\npaths = "/data/dicom"\n', "protected.paths must be a list"),
    ('[protected]\npaths = [1]\n', "protected.paths[0] = 1 is not a string"),
    ('[protected\n', "not valid TOML"),
    ('paths = ["/x"]\n', "unknown key 'paths'"),
    ('', "missing [protected] table"),
])
def test_policy_file_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "protected-paths.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_protected_paths(f)
    assert message in str(err.value) and str(f) in str(err.value)


def test_policy_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="protected-paths file not found"):
        load_protected_paths(tmp_path / "nope.toml")


def test_policy_file_normalises_and_dedupes(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[protected]\npaths = ["/data/dicom/", "/data//dicom", "/srv/pacs"]\n')
    assert load_protected_paths(f) == ["/data/dicom", "/srv/pacs"]


@settings(max_examples=100)
@given(st.text(max_size=200))
def test_policy_file_garbage_gives_config_error_only(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    f = tmp_path_factory.mktemp("p") / "p.toml"
    f.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates make invalid UTF-8 on purpose
    try:
        result = load_protected_paths(f)
    except ConfigError:
        return
    assert all(p.startswith("/") for p in result)
